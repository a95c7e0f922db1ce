"""``leanfm export DIR --standalone`` / ``--gguf OUT.gguf``: make a model usable outside leanfm.

``--standalone`` writes ``auto_map`` into ``DIR/config.json`` (folders saved before it was always written get it
too) and copies ``modeling_leanfm.py`` (torch and transformers only) into ``DIR``; stock transformers then loads
the folder with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

``--gguf OUT.gguf [--quant bf16|q8_0|q4_0|q4_1|f32]`` writes a GGUF that llama.cpp loads (a dense llama folder or a
compressed one whose blocks llama.cpp can express: see :mod:`leanfm.compress.gguf`); q8_0/q4_0/q4_1 are made by
llama.cpp's own quantizer (llama-cpp-python).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from leanfm.cli.common import add_json_flag, check_json_target, emit
from leanfm.compress.api import export_standalone
from leanfm.compress.gguf import QUANTS, export_gguf
from leanfm.errors import LeanfmError

GGUF_KEYS = ("out", "arch", "quant", "bytes", "layers", "n_head", "n_head_kv", "n_ff", "tensor_types", "seconds")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("export", help="make a model folder usable without leanfm (transformers or llama.cpp)")
    p.add_argument("folder", help="a folder written by 'leanfm compress' (or a dense llama folder for --gguf)")
    p.add_argument("--standalone", action="store_true",
                   help="copy modeling_leanfm.py into the folder (load with trust_remote_code=True)")
    p.add_argument("--gguf", metavar="OUT.gguf", default=None, help="write a GGUF file for llama.cpp")
    p.add_argument("--quant", default="bf16", choices=QUANTS,
                   help="GGUF weight type (q8_0/q4_0/q4_1 via llama.cpp's quantizer) [default bf16]")
    add_json_flag(p)
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if not args.standalone and not args.gguf:
        raise LeanfmError("nothing to export; accepted: --standalone and/or --gguf OUT.gguf")
    folder = Path(args.folder)
    if not folder.is_dir():
        raise LeanfmError(f"'{folder}' is not a folder; accepted: a folder written by 'leanfm compress'")
    check_json_target(args)
    result: dict[str, Any] = {"folder": str(folder)}
    keys: list[str] = ["folder"]
    if args.gguf:
        result |= export_gguf(folder, Path(args.gguf), quant=args.quant)
        keys += GGUF_KEYS
    if args.standalone:
        written = export_standalone(folder)
        result |= {"modeling_file": str(written),
                   "load": f"AutoModelForCausalLM.from_pretrained('{folder}', trust_remote_code=True)"}
        keys += ["modeling_file", "load"]
    emit(args, result, keys)
    return 0
