"""Run a test's worker in D processes the way `torchrun` would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT set; gloo on CPU), one torch thread each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, script: str, args: list[str], out: Path, timeout: float = 120) -> list[dict]:
    """Run `python script *args` as ranks 0..world-1; each writes `out/rank{r}.json`; returns those, by rank."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(subprocess.Popen([sys.executable, script, *args, str(out)], env=env, stderr=subprocess.PIPE))
    errors = []
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} of {world} timed out after {timeout} s") from None
        if proc.returncode:
            errors.append(f"rank {rank} exited with {proc.returncode}:\n{err.decode()[-3000:]}")
    assert not errors, "\n".join(errors)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def write_result(out: str, rank: int, result: dict) -> None:
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
