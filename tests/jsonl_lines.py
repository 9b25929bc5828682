"""Input files for the commands under test: JSONL whose lines may also be given as raw (malformed) text."""
import json


def write_jsonl_lines(path, lines):
    """Each dict (or list) as a JSON line, each string as it is; returns path."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path
