"""What the H200 run runs on: GPU, torch and CUDA, and whether each module the bench needs imports (and from where).

Usage: python bench/h200/env_check.py RESULTS.jsonl LABEL MODULE...   (exit 1 if a module fails to import)
"""
from __future__ import annotations

import importlib
import json
import sys
import time
import warnings


def main() -> int:
    out, label, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    warnings.filterwarnings("ignore")
    import torch

    info: dict[str, object] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                               "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    imports: dict[str, str] = {}
    for name in names:
        try:
            module = importlib.import_module(name)
            where = getattr(module, "__file__", None) or "?"
            imports[name] = f"ok {getattr(module, '__version__', '')} {where}".replace("  ", " ")
        except Exception as err:  # any failure to import is the finding
            imports[name] = f"FAILED {type(err).__name__}: {err}"
    for key, value in info.items():
        print(f"  {key:16s} {value}")
    for name, state in imports.items():
        print(f"  import {name:24s} {state}")
    with open(out, "a") as f:
        f.write(json.dumps({"section": "env", "label": label, **info, "imports": imports,
                            "time": round(time.time(), 1)}) + "\n")
    return 1 if any(v.startswith("FAILED") for v in imports.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
