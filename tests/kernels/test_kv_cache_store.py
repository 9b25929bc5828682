"""store_kvcache: the Triton kernel (under TRITON_INTERPRET=1), the C one for CPU and the torch path against a
plain per-token loop, into NaN-poisoned caches so every slot that must stay untouched is seen to stay so."""
import os

import pytest
import torch

from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE
from promptcot_engine.kernels.kv_cache_store import (
    store_kvcache,
    store_kvcache_cpu,
    store_kvcache_torch,
    store_kvcache_triton,
)

# a GPU run turns the interpreter off (TRITON_INTERPRET=0): the Triton kernel then runs compiled, on CUDA
KERNEL_DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"


def make_case(T, num_blocks, block_size, nkv, d, dtype, seed, skipped=(1, 4)):
    g = torch.Generator().manual_seed(seed)
    # keys and values as slices of one fused projection output: token stride > nkv * d, as in the engine
    qkv = torch.randn(T, 3, nkv, d, generator=g).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slot_mapping = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slot_mapping[[i for i in skipped if i < T]] = -1
    k_cache = torch.full((num_blocks, block_size, nkv, d), float("nan"), dtype=dtype)
    return key, value, k_cache, k_cache.clone(), slot_mapping


def run_store(store, key, value, k_cache, v_cache, slot_mapping):
    """Store into the caches in place, on the kernel's device for the Triton kernel."""
    device = KERNEL_DEVICE if store is store_kvcache_triton else "cpu"
    k_on_device, v_on_device = k_cache.to(device), v_cache.to(device)
    store(key.to(device), value.to(device), k_on_device, v_on_device, slot_mapping.to(device))
    k_cache.copy_(k_on_device)
    v_cache.copy_(v_on_device)


def expected_caches(key, value, k_cache, v_cache, slot_mapping):
    k_want, v_want = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_want[slot // block_size, slot % block_size] = key[t]
            v_want[slot // block_size, slot % block_size] = value[t]
    return k_want, v_want


C_STORE = pytest.param(store_kvcache_cpu, id="c", marks=pytest.mark.skipif(not CPU_KERNELS_AVAILABLE,
                                                                          reason="the CPU kernels are not built"))


@pytest.mark.parametrize("store", [store_kvcache_triton, C_STORE, store_kvcache_torch], ids=["triton", "c", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,num_blocks,block_size,nkv,d", [(7, 5, 4, 3, 13), (9, 3, 16, 2, 64), (1, 2, 8, 1, 5)])
def test_store_matches_per_token_loop(store, dtype, T, num_blocks, block_size, nkv, d):
    key, value, k_cache, v_cache, slot_mapping = make_case(T, num_blocks, block_size, nkv, d, dtype, seed=T + d)
    k_want, v_want = expected_caches(key, value, k_cache, v_cache, slot_mapping)
    run_store(store, key, value, k_cache, v_cache, slot_mapping)
    # exact copies; untouched slots (never mapped, or mapped by a negative slot) must still be NaN
    torch.testing.assert_close(k_cache, k_want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_want, rtol=0, atol=0, equal_nan=True)
    assert int((~k_cache.isnan().all(-1).all(-1)).sum()) == int((slot_mapping >= 0).sum())


def test_all_slots_negative_writes_nothing():
    key, value, k_cache, v_cache, _ = make_case(4, 2, 4, 2, 8, torch.float32, seed=1)
    slot_mapping = torch.full((4,), -1, dtype=torch.int64)
    for store in (store_kvcache_triton, store_kvcache_torch):
        run_store(store, key, value, k_cache, v_cache, slot_mapping)
        assert k_cache.isnan().all() and v_cache.isnan().all()


@pytest.mark.parametrize("store", [store_kvcache_triton, store_kvcache_torch], ids=["triton", "torch"])
def test_casts_to_the_cache_dtype(store):
    key, value, _, _, slot_mapping = make_case(5, 2, 4, 2, 8, torch.float32, seed=2, skipped=())
    k_cache = torch.full((2, 4, 2, 8), float("nan"), dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    run_store(store, key, value, k_cache, v_cache, slot_mapping)
    block, offset = slot_mapping // 4, slot_mapping % 4
    # the interpreter rounds fp32 -> bf16 toward zero where torch and the GPU round to nearest: one ulp apart
    tol = dict(rtol=0, atol=0) if store is store_kvcache_torch else dict(rtol=2**-7, atol=0)
    torch.testing.assert_close(k_cache[block, offset], key.bfloat16(), **tol)
    torch.testing.assert_close(v_cache[block, offset], value.bfloat16(), **tol)


def test_c_store_refuses_another_dtype():
    """It copies bytes: a key of another dtype than the cache is an error, never a reinterpretation (the
    dispatcher sends such a store to the torch path, which casts)."""
    key, value, _, _, slot_mapping = make_case(5, 2, 4, 2, 8, torch.float32, seed=2)
    k_cache = torch.zeros((2, 4, 2, 8), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        store_kvcache_cpu(key, value, k_cache, k_cache.clone(), slot_mapping)


def test_dispatch_rejects_mismatched_shapes():
    key, value, k_cache, v_cache, slot_mapping = make_case(4, 2, 4, 2, 8, torch.float32, seed=3)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kvcache(key, value, k_cache, v_cache, slot_mapping[:3])
    with pytest.raises(ValueError, match="caches"):
        store_kvcache(key[:, :1], value[:, :1], k_cache, v_cache, slot_mapping)
