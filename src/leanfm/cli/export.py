"""``leanfm export DIR --standalone``: make a compressed folder loadable by users without leanfm.

It writes ``auto_map`` into ``DIR/config.json`` (folders saved before it was always written get it too) and
copies ``modeling_leanfm.py`` (torch and transformers only) into ``DIR``; stock transformers then loads the
folder with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from leanfm.cli.common import add_json_flag, check_json_target, emit
from leanfm.compress.api import export_standalone
from leanfm.errors import LeanfmError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("export", help="make a compressed model folder loadable without leanfm")
    p.add_argument("folder", help="a folder written by 'leanfm compress'")
    p.add_argument("--standalone", action="store_true",
                   help="copy modeling_leanfm.py into the folder (load with trust_remote_code=True)")
    add_json_flag(p)
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if not args.standalone:
        raise LeanfmError("nothing to export; accepted: --standalone")
    folder = Path(args.folder)
    if not folder.is_dir():
        raise LeanfmError(f"'{folder}' is not a folder; accepted: a folder written by 'leanfm compress'")
    check_json_target(args)
    written = export_standalone(folder)
    emit(args, {"folder": str(folder), "modeling_file": str(written),
                "load": f"AutoModelForCausalLM.from_pretrained('{folder}', trust_remote_code=True)"})
    return 0
