"""Which devices a run checks, and how the report names them."""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch

from .machine import cpu_summary
from .report import Result


def resolve_devices(spec: Optional[str]) -> Tuple[List[str], List[Result]]:
    """Device names to check, and failure rows for devices that were asked for but are absent."""
    parts = [p.strip() for p in (spec or "all").split(",") if p.strip()]
    out, problems = [], []
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for p in parts:
        if p == "all":
            out += ["cpu"] + [f"cuda:{i}" for i in range(n_cuda)]
        elif p == "cpu":
            out.append("cpu")
        elif p == "cuda" or re.fullmatch(r"cuda:\d+", p):
            if n_cuda == 0:
                why = (
                    "this torch has no CUDA support"
                    if torch.version.cuda is None
                    else "torch.cuda.is_available() is False (no GPU visible, or a driver problem)"
                )
                problems.append(
                    Result(
                        "device", p, "-", "present", False, detail=f"{p} was asked for but {why}"
                    )
                )
            elif p == "cuda":
                out += [f"cuda:{i}" for i in range(n_cuda)]
            elif int(p.split(":")[1]) >= n_cuda:
                problems.append(
                    Result(
                        "device",
                        p,
                        "-",
                        "present",
                        False,
                        detail=f"{p} was asked for but only {n_cuda} CUDA device(s) are visible",
                    )
                )
            else:
                out.append(p)
        else:
            raise ValueError(f"unknown device {p!r}: use cpu, cuda, cuda:N or all")
    seen = []
    for d in out:
        if d not in seen:
            seen.append(d)
    return seen, problems


def device_label(dev: str) -> str:
    if dev == "cpu":
        return f"cpu ({cpu_summary()})"
    i = int(dev.split(":")[1])
    return f"{dev} ({torch.cuda.get_device_name(i)}, sm_%d%d)" % torch.cuda.get_device_capability(i)
