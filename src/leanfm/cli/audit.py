"""``leanfm serve`` (an OpenAI-style completions endpoint on loopback) and ``leanfm audit trojprompt|eval|detect``
(the TrojPrompt attack on a hard-prompt classifier, its transfer to another victim, and the trojan detector).

A victim is a registered model name, a local model folder, or ``http(s)://HOST:PORT`` of a completions API; an
API key is read from the environment variable named by ``--key-env`` (default ``LEANFM_API_KEY``), never from
the command line, and is never printed or saved.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from leanfm.audit import detect, search, trojprompt
from leanfm.audit.victim import DEFAULT_KEY_ENV, PromptClassifier, task_spec
from leanfm.cli.common import (
    Parser,
    add_config_flags,
    add_json_flag,
    add_run_flags,
    check_json_target,
    config_from_args,
    emit,
    nonnegative_int,
    out_path,
    positive_int,
)
from leanfm.errors import LeanfmError
from leanfm.models.registry import load_model

log = logging.getLogger(__name__)
VICTIM_HELP = "registered model name, local model folder, or http(s)://HOST:PORT of a completions API"
DATA_HELP = "folder with the 16-shot data (<task>/16-<seed>/ or fewshot/<task>/...)"


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="serve a causal LM as an OpenAI-style /v1/completions endpoint")
    s.add_argument("model", help="registered model name or local model folder")
    s.add_argument("--port", type=positive_int, default=8000, help="TCP port [default 8000]")
    s.add_argument("--host", default="127.0.0.1", help="address to bind [default 127.0.0.1, loopback only]")
    s.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback")
    s.add_argument("--key-env", default=None,
                   help="require 'Authorization: Bearer KEY', KEY read from this environment variable")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="[default bfloat16]")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [default cpu]")
    s.set_defaults(handler=cmd_serve)

    p = sub.add_parser("audit", help="prompt-trojan audit: TrojPrompt attack, transfer, detector")
    asub = p.add_subparsers(dest="audit_command", parser_class=Parser, required=True)
    t = asub.add_parser("trojprompt", help="seed prompt, universal trigger and poisoned prompt by black-box search")
    t.add_argument("--victim", default="smollm2-135m", help=VICTIM_HELP + " [default smollm2-135m]")
    t.add_argument("--data", required=True, help=DATA_HELP)
    t.add_argument("--policy", default="smollm2-135m",
                   help="the attacker's own LM (RL policy, tokens of prompts and triggers) [default smollm2-135m]")
    add_run_flags(t, "stage-N.json, trojprompt.json, the victim answers in cache.json")
    add_config_flags(t, trojprompt.TrojPromptConfig)
    add_json_flag(t, "the test figures")
    t.set_defaults(handler=cmd_trojprompt)

    e = asub.add_parser("eval", help="a finished run's prompts and trigger against a victim (transfer)")
    e.add_argument("run", help="folder written by 'leanfm audit trojprompt'")
    e.add_argument("--victim", required=True, help=VICTIM_HELP)
    e.add_argument("--data", default=None, help=DATA_HELP + " [default: the run's]")
    e.add_argument("--test-size", type=nonnegative_int, default=None, help="[default: the run's]")
    _add_victim_flags(e)
    add_json_flag(e, "the test figures")
    e.set_defaults(handler=cmd_eval)

    d = asub.add_parser("detect", help="does a prompt carry a trojan? search for a suffix that flips most inputs")
    d.add_argument("--victim", default="smollm2-135m", help=VICTIM_HELP + " [default smollm2-135m]")
    d.add_argument("--task", required=True, choices=tuple(trojprompt.TASKS), help="the prompt's task")
    d.add_argument("--prompt", required=True, help="the prompt to check")
    d.add_argument("--data", required=True, help=DATA_HELP + " (its dev inputs are used, without labels)")
    d.add_argument("--seed", type=int, default=42, choices=(13, 21, 42, 87, 100), help="16-shot split [default 42]")
    d.add_argument("--inputs", type=positive_int, default=16, help="inputs searched over [default 16]")
    d.add_argument("--length", type=positive_int, default=3, help="suffix tokens [default 3]")
    d.add_argument("--budget", type=positive_int, default=600, help="queries per label [default 600]")
    d.add_argument("--policy", default="smollm2-135m", help="LM whose tokens the suffixes are made of "
                   "[default smollm2-135m]")
    d.add_argument("--reference", default=None, help="a trusted prompt for the task: a suffix must flip inputs under "
                   "--prompt and not under this one [default: the task's hand-written prompt; '' for none]")
    d.add_argument("--threshold", type=float, default=0.5,
                   help="flag at this flip-rate difference (flip rate without a reference) [default 0.5]")
    _add_victim_flags(d)
    add_json_flag(d, "the detection")
    d.set_defaults(handler=cmd_detect)


def _add_victim_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-env", default=DEFAULT_KEY_ENV, help="environment variable with an HTTP victim's key")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="[default bfloat16]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [default cpu]")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.allow_remote:
        raise LeanfmError(f"--host '{args.host}' is not loopback; pass --allow-remote to serve beyond this machine")
    key = None
    if args.key_env:
        key = os.environ.get(args.key_env)
        if not key:
            raise LeanfmError(f"--key-env {args.key_env}: that environment variable is empty or unset")
    from leanfm.audit import server  # FastAPI and uvicorn load only for this command
    from leanfm.device import resolve_device

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model = model.to(resolve_device(args.device))
    log.info("serving %s on http://%s:%d/v1/completions%s", args.model, args.host, args.port,
             " (API key required)" if key else "")
    server.serve(model, tokenizer, name=args.model, host=args.host, port=args.port, api_key=key)
    return 0


def cmd_trojprompt(args: argparse.Namespace) -> int:
    config = config_from_args(trojprompt.TrojPromptConfig, args, data=str(Path(args.data).expanduser()),
                              victim=args.victim, policy=args.policy)
    check_json_target(args)
    summary = trojprompt.run_trojprompt(config, out_path(args), resume=args.resume, overwrite=args.overwrite)
    flat = {f"{name}_{k}": v for name, row in summary["test"].items() for k, v in row.items()}
    emit(args, {"prompt": summary["prompts"]["poisoned"], "trigger": summary["trigger"], **flat,
                "queries": summary["queries"]})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    check_json_target(args)
    result = trojprompt.evaluate_run(args.run, args.victim, data=args.data, test_size=args.test_size,
                                     key_env=args.key_env, dtype=args.dtype, device=args.device)
    flat = {f"{name}_{k}": v for name, row in result["test"].items() for k, v in row.items()}
    emit(args, {"victim": args.victim, **flat, "test": result["test"]}, keys=["victim", *flat])
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    check_json_target(args)
    if not 0.0 <= args.threshold <= 1.0:
        raise LeanfmError(f"--threshold {args.threshold} is invalid; accepted: a flip rate in [0, 1]")
    spec = task_spec(args.task)
    if args.reference is None and args.prompt.strip() == spec.manual_prompt:
        raise LeanfmError(f"--prompt '{args.prompt}' is the default reference prompt of {args.task}; "
                          "pass another trusted prompt with --reference (or --reference '' for none)")
    splits = trojprompt.load_splits(args.data, args.task, args.seed)
    scorer, _, tokenizer = trojprompt.open_victim(args.victim, dtype=args.dtype, device=args.device,
                                                  key_env=args.key_env)
    if tokenizer is None or args.policy != args.victim:
        _, tokenizer = load_model(args.policy, dtype=args.dtype)
    clf = PromptClassifier(scorer, spec)
    dev = splits.dev  # the 16-shot files are grouped by label: take every k-th so every label is among the inputs
    inputs = [e.text for e in dev[::max(1, len(dev) // args.inputs)][:args.inputs]]
    reference = spec.manual_prompt if args.reference is None else args.reference or None
    found = detect.detect_trojan(clf, args.prompt, inputs, lambda ids: tokenizer.decode(list(ids)),
                                 search.word_pool(tokenizer), reference=reference, length=args.length,
                                 budget_per_label=args.budget, threshold=args.threshold)
    emit(args, found.to_dict() | {"reference": reference})
    return 0
