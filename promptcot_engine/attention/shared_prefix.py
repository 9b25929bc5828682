"""Decode attention that reads a shared prefix once (CPU path).

The engine's signature workload is n > 1 samples of one prompt (the E-step's K rationales per seed pair):
the samples share the prompt's KV blocks. On CPU, decode attention is bound by reading the KV cache, and a
plain paged decode reads the shared prompt once per sample. Here sequences whose block tables start with
the same blocks form a group; the group's queries attend to the common prefix in one product (its KV read
once), each sequence attends to its own remaining blocks, and the two partial softmaxes are merged exactly
through their log-sum-exps, so the result equals attention over the whole context.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from promptcot_engine.kernels.attention_states import additive_key_mask, attention_with_lse, merge_attn_states
from promptcot_engine.kernels.paged_attention import PagedGather


@dataclass
class AttentionPart:
    """One part of the context for a set of query rows, with everything the layers reuse at this step."""
    gather: PagedGather
    key_lens: torch.Tensor  # [N] tokens of the part each row sees
    key_mask: torch.Tensor  # key_length_mask(key_lens), made from the gather's in_context

    @classmethod
    def build(cls, blocks: torch.Tensor, key_lens: torch.Tensor, block_size: int, dtype: torch.dtype) -> "AttentionPart":
        gather = PagedGather.plan(blocks, key_lens, block_size)
        return cls(gather, key_lens, additive_key_mask(gather.in_context, dtype))


@dataclass
class SharedPrefixPlan:
    group_of_seq: torch.Tensor  # [B] int64
    slot_in_group: torch.Tensor  # [B] int64
    max_members: int
    prefix: AttentionPart  # per group: the full blocks its members share
    suffix: AttentionPart  # per sequence: its blocks after its group's prefix


def plan_shared_prefix(block_tables: list[list[int]], context_lens: list[int], block_size: int,
                       device: torch.device, dtype: torch.dtype = torch.float32) -> SharedPrefixPlan | None:
    """Group sequences by the deepest block they share with another sequence of the batch (samples of one
    prompt share all its full blocks; unrelated prompts may share only a common preamble's first blocks,
    which must not pull them into one group), and take each group's longest common run of full blocks.
    None when no two sequences share a block: the plain paged path is then just as good. dtype: the KV
    cache's, for the key masks."""
    uses = Counter(block for table in block_tables for block in set(table))
    if all(n == 1 for n in uses.values()):
        return None
    groups: dict[tuple, list[int]] = {}
    for i, table in enumerate(block_tables):
        depth = next((j for j, block in enumerate(table) if uses[block] == 1), len(table))
        groups.setdefault((depth, table[depth - 1]) if depth else ("alone", i), []).append(i)
    group_of_seq, slot_in_group = [0] * len(block_tables), [0] * len(block_tables)
    prefixes, suffixes, suffix_lens = [], [None] * len(block_tables), [0] * len(block_tables)
    for g, members in enumerate(groups.values()):
        if len(members) == 1:
            common = 0  # nothing to share: the whole context goes through the per-sequence part
        else:
            common = min((context_lens[i] - 1) // block_size for i in members)  # full blocks, never the newest token's
            first = block_tables[members[0]]
            for i in members[1:]:
                table = block_tables[i]
                common = next((j for j in range(common) if table[j] != first[j]), common)
        prefixes.append(block_tables[members[0]][:common])
        for slot, i in enumerate(members):
            group_of_seq[i], slot_in_group[i] = g, slot
            used = -(-context_lens[i] // block_size)
            suffixes[i] = block_tables[i][common:used]
            suffix_lens[i] = context_lens[i] - common * block_size

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)

    prefix_lens = torch.tensor([len(p) * block_size for p in prefixes], device=device)
    return SharedPrefixPlan(
        group_of_seq=torch.tensor(group_of_seq, device=device), slot_in_group=torch.tensor(slot_in_group, device=device),
        max_members=max(len(m) for m in groups.values()),
        prefix=AttentionPart.build(padded(prefixes), prefix_lens, block_size, dtype),
        suffix=AttentionPart.build(padded(suffixes), torch.tensor(suffix_lens, device=device), block_size, dtype))


def _partial_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, part: AttentionPart,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, nkv, R, d] against the part's tokens -> output [N, nkv, R, d] and log-sum-exp [N, nkv, R]
    (-inf where a row sees nothing). The gather zeroes past each length: stale slots may be NaN."""
    keys, values = part.gather.gather(k_cache), part.gather.gather(v_cache)
    return attention_with_lse(q, keys, values, scale, key_lens=part.key_lens, key_mask=part.key_mask)


def shared_prefix_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   plan: SharedPrefixPlan, scale: float) -> torch.Tensor:
    """q [B, num_heads, head_dim] -> [B, num_heads, head_dim]: attention over each sequence's whole context."""
    B, num_heads, head_dim = q.shape
    nkv = k_cache.shape[2]
    group_size = num_heads // nkv
    grouped = q.view(B, nkv, group_size, head_dim).to(k_cache.dtype)

    # the common prefix: each group's members stacked as extra query rows of the same kv head
    G, M = plan.prefix.key_lens.shape[0], plan.max_members
    group_q = grouped.new_zeros(G, M, nkv, group_size, head_dim)
    group_q[plan.group_of_seq, plan.slot_in_group] = grouped
    group_q = group_q.permute(0, 2, 1, 3, 4).reshape(G, nkv, M * group_size, head_dim)
    prefix_out, prefix_lse = _partial_attention(group_q, k_cache, v_cache, plan.prefix, scale)

    def per_seq(t: torch.Tensor) -> torch.Tensor:  # [G, nkv, M * g, ...] -> [B, nkv, g, ...]
        t = t.view(G, nkv, M, group_size, *t.shape[3:]).transpose(1, 2)
        return t[plan.group_of_seq, plan.slot_in_group]

    own_out, own_lse = _partial_attention(grouped, k_cache, v_cache, plan.suffix, scale)
    out = merge_attn_states(per_seq(prefix_out), per_seq(prefix_lse), own_out, own_lse)
    return out.reshape(B, num_heads, head_dim).to(q.dtype)
