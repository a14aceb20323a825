"""``python -m stage2_hidden.inspect DIR``: summary of a shard set, and every checksum validated."""
from __future__ import annotations

import argparse
import sys

from .format import bytes_per_token
from .reader import ShardDataset
from .vocab import load_vocab


def summary(path: str) -> str:
    ds = ShardDataset(path)
    m = ds.manifest
    d2t, t2d = load_vocab(path)
    width = m["num_aux_layers"] * m["hidden_size"]
    expected = bytes_per_token(width, m["num_aux_layers"], m.get("dtype", "bfloat16"))
    formula = "3*H+12+9" if m.get("dtype") == "float8_e4m3" else "3*H*2+9"
    lines = [
        f"dir             {path}",
        f"target          {m['target'].get('name')} ({m['target'].get('path')})",
        f"layer ids       {m['layer_ids']}  hidden {m['hidden_size']}  dtype {m['dtype']}",
        f"rows            {m['num_rows']:,}  in {len(m['shards'])} shards",
        f"tokens          {m['num_tokens']:,}  (loss tokens {m.get('num_loss_tokens', 0):,})",
        f"bytes           {m['bytes']:,}  = {m['bytes_per_token']:.1f} bytes/token ({formula} = {expected})",
        f"draft vocab     {len(d2t):,} of {len(t2d):,}  coverage {m.get('coverage', float('nan')):.4f}",
        f"max length      {m['max_length']}",
        f"accounting      {m.get('accounting', {})}",
    ]
    ds.verify()  # every shard whole: the file's sha256 and, where its record has them, each row's
    per_row = sum("row_sha256" in (r or {}) for r in ds.checks.records)
    lines.append(f"checksums       ok ({len(m['shards'])} shards); per-row sha256 for {per_row} "
                 "(stage 3 checks each row as it reads it)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", help="a stage-2 output folder")
    args = parser.parse_args(argv)
    try:
        print(summary(args.dir))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
