"""Sharded, crash-safe output of stage 1: ``shard-NNNNN.{jsonl,parquet}`` + ``manifest.json``.

Invariants (they make ``kill -9`` + resume lose and duplicate nothing):

* A finished conversation is one line appended to ``shard-NNNNN.jsonl.partial`` with a single write,
  then flush + fsync. A line without its ``\\n`` was cut by a crash: resume truncates it away.
* When a partial shard holds ``rows_per_shard`` rows it is finalised: (jsonl) fsync + rename to
  ``shard-NNNNN.jsonl``; (parquet) written to ``.tmp``, fsync, rename, then the partial is removed.
  A partial whose final shard exists is a leftover of a crash between the two steps and is removed.
* Ids are unique in the input (``formats`` skips repeats), so "id in a shard" = "done".
* ``skipped.jsonl`` / ``failed.jsonl`` describe the current pass only: resume starts them afresh (bad
  records are found again by the loader; failed conversations are tried again).
* ``manifest.json`` (written last, atomically, with ``complete: true``) lists every shard with its rows
  and sha256, the accounting ``input = written + skipped + failed`` with ``written`` = the shards' rows (a
  folder holding rows that this pass's input lacks is refused: its accounting would describe another set)
  and ``token_ids``: how many rows carry the server's token ids on every generated turn (vLLM) and how
  many do not (``transformers serve`` returns text only; stage 2 then re-tokenises the text with the chat
  template).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from common.files import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_file

from .formats import SAMPLE_FORMAT

PARTIAL = ".partial"


def has_server_ids(record: dict[str, Any]) -> bool:
    """Every generated assistant turn (one with a ``finish_reason``) carries the server's token ids."""
    generated = [m for m in record.get("messages", ())
                 if m.get("role") == "assistant" and m.get("finish_reason") is not None]
    return bool(generated) and all(m.get("completion_token_ids") and m.get("prompt_token_ids") is not None
                                   for m in generated)


def _complete_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file written by this module, after truncating a crash-cut last line."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    for line in data[:keep].splitlines():
        if line.strip():
            yield json.loads(line)


class AppendLog:
    """An fsync-per-record JSONL file (``skipped.jsonl`` / ``failed.jsonl``)."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._f = open(path, "wb")  # a fresh file per pass (see the module docstring)

    def append(self, record: dict[str, Any]) -> None:
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())
        self.count += 1

    def close(self) -> None:
        self._f.close()


class ConversationWriter:
    def __init__(self, out_dir: str | Path, fmt: str = "jsonl", rows_per_shard: int = 1000, resume: bool = True):
        if fmt not in ("jsonl", "parquet"):
            raise ValueError(f"unknown shard format {fmt!r} (jsonl | parquet)")
        self.dir, self.fmt, self.rows_per_shard = Path(out_dir), fmt, rows_per_shard
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = self._final_shards() + sorted(self.dir.glob(f"shard-*.jsonl{PARTIAL}"))
        if existing and not resume:
            raise ValueError(
                f"{self.dir} already holds shards; pass sample.resume=true to continue that run "
                "or choose another sample.output"
            )
        (self.dir / "manifest.json").unlink(missing_ok=True)  # the run is incomplete until a new one lands
        self.done_ids: set[str] = set()
        self.shard_rows: dict[str, int] = {}  # final shard file name -> rows
        self.token_ids = {"with_server_ids": 0, "without_server_ids": 0}  # rows of all shards (see has_server_ids)
        self._recover()
        self.skipped = AppendLog(self.dir / "skipped.jsonl")
        self.failed = AppendLog(self.dir / "failed.jsonl")
        self._partial: Any = None
        self._partial_rows = 0
        self._next_index = 1 + max((self._index(p) for p in self._final_shards()), default=-1)

    # ------------------------------------------------------------------------------ recovery

    @staticmethod
    def _index(path: Path) -> int:
        return int(path.name.split(".")[0].split("-")[1])

    def _final_shards(self) -> list[Path]:
        return sorted([*self.dir.glob("shard-*.jsonl"), *self.dir.glob("shard-*.parquet")], key=self._index)

    def _recover(self) -> None:
        """Collect done ids from final shards; finalise (or drop stale) partial shards left by a crash."""
        for tmp in [*self.dir.glob("*.tmp"), *self.dir.glob(".tmp-*")]:  # atomic writes cut by a crash
            tmp.unlink()
        for shard in self._final_shards():
            ids, with_ids = self._shard_ids(shard)
            self.shard_rows[shard.name] = len(ids)
            self.done_ids.update(ids)
            self.token_ids["with_server_ids"] += with_ids
            self.token_ids["without_server_ids"] += len(ids) - with_ids
        for partial in sorted(self.dir.glob(f"shard-*.jsonl{PARTIAL}")):
            index = self._index(partial)
            if any(self._index(s) == index for s in self._final_shards()):
                partial.unlink()  # crash between writing the final shard and removing its partial
                continue
            rows = list(_complete_lines(partial))
            if rows:
                self._finalise(partial, index, rows)
                self.done_ids.update(r["id"] for r in rows)
                for r in rows:
                    self._count(r)
            else:
                partial.unlink()

    @staticmethod
    def _shard_ids(shard: Path) -> tuple[list[str], int]:
        """(ids of a final shard, how many of its rows have server ids)."""
        if shard.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(shard, columns=["id", "messages"]).to_pylist()
        else:
            rows = [json.loads(line) for line in shard.read_bytes().splitlines() if line.strip()]
        return [r["id"] for r in rows], sum(has_server_ids(r) for r in rows)

    def _count(self, record: dict[str, Any]) -> None:
        self.token_ids["with_server_ids" if has_server_ids(record) else "without_server_ids"] += 1

    # ------------------------------------------------------------------------------ writing

    def write(self, record: dict[str, Any]) -> None:
        """Append one finished conversation durably; finalise the shard when it is full."""
        if record["id"] in self.done_ids:
            raise AssertionError(f"duplicate id {record['id']!r}")  # formats + resume guarantee uniqueness
        if self._partial is None:
            self._partial_path = self.dir / f"shard-{self._next_index:05d}.jsonl{PARTIAL}"
            self._partial = open(self._partial_path, "ab")
            fsync_dir(self.dir)
        self._partial.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._partial.flush()
        os.fsync(self._partial.fileno())
        self.done_ids.add(record["id"])
        self._count(record)
        self._partial_rows += 1
        if self._partial_rows >= self.rows_per_shard:
            self._close_partial()

    def skip(self, cid: str, reason: str, **extra: Any) -> None:
        self.skipped.append({"id": cid, "reason": reason, **extra})

    def fail(self, cid: str, error: str) -> None:
        self.failed.append({"id": cid, "error": error})

    def _close_partial(self) -> None:
        if self._partial is None:
            return
        self._partial.close()
        self._partial = None
        rows = list(_complete_lines(self._partial_path))
        self._finalise(self._partial_path, self._next_index, rows)
        self._next_index += 1
        self._partial_rows = 0

    def _finalise(self, partial: Path, index: int, rows: list[dict[str, Any]]) -> None:
        final = self.dir / f"shard-{index:05d}.{self.fmt}"
        if self.fmt == "jsonl":
            with open(partial, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(partial, final)
            fsync_dir(self.dir)
        else:
            from .parquet import rows_to_parquet_bytes

            atomic_write_bytes(final, rows_to_parquet_bytes(rows))
            partial.unlink()
            fsync_dir(self.dir)
        self.shard_rows[final.name] = len(rows)

    def finish(self, manifest_fields: dict[str, Any], accounting: dict[str, int]) -> dict[str, Any]:
        """Finalise the last shard and write ``manifest.json`` (``complete: true``) atomically."""
        self._close_partial()
        self.skipped.close()
        self.failed.close()
        if accounting["input"] != accounting["written"] + accounting["skipped"] + accounting["failed"]:
            raise AssertionError(f"accounting does not add up: {accounting}")
        num_rows = sum(self.shard_rows.values())
        if num_rows != accounting["written"]:
            # rows of an earlier pass whose ids this pass's input lacks: the input changed under the same settings
            raise ValueError(f"{self.dir} holds {num_rows} conversations but this pass's input accounts for "
                             f"{accounting['written']} of them: the folder holds records that are not in this input "
                             "(was the input file edited?); write to another sample.output")
        shards = [
            {"file": name, "rows": rows, "sha256": sha256_file(self.dir / name)}
            for name, rows in sorted(self.shard_rows.items(), key=lambda kv: self._index(Path(kv[0])))
        ]
        manifest = {
            "format": SAMPLE_FORMAT,
            **manifest_fields,
            "shards": shards,
            "num_rows": num_rows,
            "accounting": accounting,
            "token_ids": dict(self.token_ids),
            "complete": True,
        }
        atomic_write_json(self.dir / "manifest.json", manifest, indent=2)
        return manifest

    def close(self) -> None:
        """Release files without finalising (an interrupted run; resume picks the partial shard up)."""
        if self._partial is not None:
            self._partial.close()
            self._partial = None
        self.skipped.close()
        self.failed.close()
