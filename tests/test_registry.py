"""The one method registry: every method registered once per family, with a config the CLI can turn into flags."""

from __future__ import annotations

import dataclasses

import pytest

import leanfm
from leanfm.cli import build_parser
from leanfm.config import MethodConfig, get_method, register_method
from leanfm.errors import LeanfmError

EXPECTED = {
    ("modegpt", "compress"), ("modegpt-heads", "compress"), ("wanda-sp", "compress"), ("svd-llm", "compress"),
    ("disp", "compress"), ("flap", "compress"), ("slicegpt", "compress"),
    ("tome", "patch"), ("tofu", "patch"), ("vit", "train"), ("dynamo", "train"), ("dynamo", "decode"),
    ("cwcl-speech", "train"), ("cwcl-image", "train"), ("slu", "train"), ("continual", "train"),
    ("mmpt", "train"), ("trojprompt", "audit"), ("t2i", "train"), ("continual-t2i", "train"),
}


def test_every_method_is_registered_once_per_family():
    specs = leanfm.list_methods()
    assert {(s.name, s.family) for s in specs} == EXPECTED
    assert len(specs) == len(EXPECTED)


@pytest.mark.parametrize(("name", "family"), sorted(EXPECTED))
def test_each_config_is_a_method_config_whose_flags_have_help(name, family):
    spec = get_method(name, family)
    assert spec.config is not None and issubclass(spec.config, MethodConfig) and spec.description
    for field in dataclasses.fields(spec.config):
        if field.metadata.get("cli", True):
            assert field.metadata.get("help"), f"{spec.config.__name__}.{field.name} has no help text"


def test_a_name_in_two_families_needs_the_family_and_unknown_names_list_the_registered_ones():
    leanfm.list_methods()
    assert get_method("dynamo", "decode").entry is not get_method("dynamo", "train").entry
    with pytest.raises(LeanfmError, match="registered in several families"):
        get_method("dynamo")
    accepted = "modegpt, modegpt-heads, wanda-sp, svd-llm, flap, disp, slicegpt"
    with pytest.raises(LeanfmError, match=f"unknown method 'sparsegpt'; accepted: {accepted}"):
        get_method("sparsegpt", "compress")
    with pytest.raises(ValueError, match="already registered"):
        register_method("modegpt", "compress", None, print)
    with pytest.raises(ValueError, match="unknown method family"):
        register_method("x", "speedup", None, print)


def test_the_cli_offers_a_flag_for_every_cli_field_of_every_compressor():
    help_text = build_parser()._subparsers._group_actions[0].choices["compress"].format_help()  # type: ignore[union-attr]
    for spec in leanfm.list_methods("compress"):
        for field in dataclasses.fields(spec.config):
            if field.metadata.get("cli", True):
                flag = "--" + (field.metadata.get("flag") or field.name).replace("_", "-")
                flag = flag.replace("--", "--no-", 1) if field.default is True else flag
                assert flag in help_text, (spec.name, flag)
