"""The one training loop: device placement, backend choice, RNG state, Ctrl-C, and the resume/overwrite rule."""

import signal
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from leanfm.config import MethodConfig, option
from leanfm.errors import LeanfmError
from leanfm.training import (
    STATE_FILE,
    DistributedContext,
    Runtime,
    Task,
    TrainingInterrupted,
    checkpoint_path,
    commit_checkpoint,
    fit,
    init_distributed,
    load_checkpoint,
    local_device,
    prepare_run,
    restore_committed,
    rng_state,
    save_checkpoint,
    set_rng_state,
    warmup_cosine,
    warmup_cosine_lr,
)
from leanfm.training import distributed as distributed_module


@dataclass
class ToyConfig(MethodConfig):
    steps: int = option(6, "steps")
    lr: float = option(0.05, "learning rate")
    checkpoint_every: int = option(2, "steps between checkpoints")
    seed: int = option(0, "seed")
    device: str = option("cpu", "device")


def toy(config: ToyConfig, runtime: Runtime, fail_at: int | None = None) -> tuple[Task, nn.Module]:
    """A regression with dropout (torch's RNG) fed by a stateful generator (a trainer generator)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    data = torch.Generator().manual_seed(config.seed)

    def batch(_step):
        x = torch.randn(8, 4, generator=data)
        return x, x.sum(-1, keepdim=True)

    def loss(step, pair):
        if step == fail_at:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a step
        x, y = pair
        value = ((model(x) - y) ** 2).mean()
        return value, {"loss": float(value.detach())}

    task = Task("toy", {"model": model}, optimizer, batch, loss, lr=warmup_cosine_lr(config.lr, config.steps, 2),
                generators={"data": data})
    return task, model


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_modules_and_batches_land_on_the_requested_device():
    seen = {}
    trainable, frozen = nn.Linear(3, 2), nn.Linear(3, 3)
    optimizer = torch.optim.SGD(trainable.parameters(), lr=0.1)

    def loss(_step, x):
        seen["batch"] = x.device
        return trainable(frozen(x)).sum(), {}

    task = Task("meta", {"net": trainable}, optimizer, lambda _s: torch.ones(2, 3), loss, frozen=(frozen,))
    fit(task, ToyConfig(steps=1), Runtime(torch.device("meta")))
    assert seen["batch"].type == "meta"
    assert trainable.weight.device.type == "meta" and frozen.weight.device.type == "meta"
    assert optimizer.param_groups[0]["params"][0] is trainable.weight  # the optimizer still holds the moved weights
    assert not frozen.weight.requires_grad and not frozen.training


def test_runtime_follows_the_config_and_autocasts_on_its_device(monkeypatch):
    import leanfm.training.loop as loop

    for native in (True, False):  # autocast only where bf16 is native: emulated bf16 trained ~10x slower
        monkeypatch.setattr(loop, "fast_bfloat16", lambda _device, native=native: native)
        runtime = Runtime.for_config(SimpleNamespace(device="cpu", autocast=True))
        assert runtime.device == torch.device("cpu") and runtime.context == DistributedContext()
        assert runtime.amp is native
        with runtime.autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
    with Runtime.for_config(SimpleNamespace(device="cpu")).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert runtime.to_device({"a": (torch.ones(1), [torch.ones(1)]), "b": 3})["b"] == 3
    with pytest.raises(LeanfmError, match="unknown device 'tpu'"):
        Runtime.for_config(SimpleNamespace(device="tpu"))


def _fake_group(monkeypatch):
    """torchrun's environment for rank 0 of 2, on a machine that claims to have CUDA; records the backend."""
    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.append(f"set_device {index}"))
    dist = distributed_module.dist
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: chosen.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    return chosen


def test_nccl_is_never_chosen_for_cpu_tensors(monkeypatch):
    chosen = _fake_group(monkeypatch)
    assert init_distributed("cpu") == DistributedContext(0, 2)
    runtime = Runtime.for_config(SimpleNamespace(device="cpu"))
    assert runtime.device == torch.device("cpu") and runtime.context.world_size == 2
    assert chosen == ["gloo", "gloo"]  # CUDA exists, but the tensors are on the CPU
    init_distributed("cuda")
    assert chosen[-2:] == ["set_device 1", "nccl"]  # this rank's GPU (LOCAL_RANK) first
    assert local_device(torch.device("cuda"), DistributedContext(1, 2)) == torch.device("cuda", 1)  # LOCAL_RANK


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed_module.dist, "init_process_group", lambda **_: pytest.fail("no group wanted"))
    assert init_distributed("cpu") == DistributedContext()
    assert DistributedContext().mean(torch.tensor(2.5)) == 2.5


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(3)
    torch.rand(5, generator=generator)
    save_checkpoint(tmp_path / "c", {"rng": rng_state(torch.device("cpu"), {"g": generator})})
    expected = torch.rand(4), torch.rand(4, generator=generator)
    torch.rand(7), torch.rand(7, generator=generator)  # move both on
    set_rng_state(load_checkpoint(tmp_path / "c")["rng"], torch.device("cpu"), {"g": generator})
    again = torch.rand(4), torch.rand(4, generator=generator)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_uninterrupted_weights(tmp_path):
    config = ToyConfig()
    task, straight = toy(config, Runtime())
    done = fit(task, config, Runtime(), checkpoint=tmp_path / "a")
    assert done.step == 6 and load_checkpoint(tmp_path / "a")["step"] == 6

    task, _ = toy(config, Runtime(), fail_at=3)
    with pytest.raises(TrainingInterrupted) as caught:
        fit(task, config, Runtime(), checkpoint=tmp_path / "b")
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.checkpoint == tmp_path / "b"
    assert load_checkpoint(tmp_path / "b")["step"] == 3  # saved on Ctrl-C, not only every 2 steps
    torch.manual_seed(123)  # the resumed process starts with other RNG state: the checkpoint's must win
    task, resumed = toy(config, Runtime())
    torch.rand(9, generator=task.generators["data"])
    again = fit(task, config, Runtime(), checkpoint=tmp_path / "b", resume=True)
    assert again.resumed_from == 3 and again.history == done.history
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight).values(), _weights(resumed).values(), strict=True))


def test_a_committed_checkpoint_resumes_on_another_machine_to_the_uninterrupted_weights(tmp_path):
    config = ToyConfig()
    task, straight = toy(config, Runtime())
    fit(task, config, Runtime())
    task, _ = toy(config, Runtime(), fail_at=3)
    with pytest.raises(TrainingInterrupted):
        fit(task, config, Runtime(), checkpoint=checkpoint_path(tmp_path / "here" / "run"))
    committed = commit_checkpoint(tmp_path / "here" / "run", tmp_path / "artifacts" / "run.training")
    with pytest.raises(LeanfmError, match="no training checkpoint"):
        commit_checkpoint(tmp_path / "here" / "other", tmp_path / "artifacts" / "other.training")
    assert restore_committed(committed, tmp_path / "there" / "run")  # a fresh machine: nothing of its own yet
    assert not restore_committed(committed, tmp_path / "there" / "run")  # its own checkpoint is never replaced
    assert not restore_committed(tmp_path / "artifacts" / "missing.training", tmp_path / "there" / "new")
    task, resumed = toy(config, Runtime())
    again = fit(task, config, Runtime(), checkpoint=checkpoint_path(tmp_path / "there" / "run"), resume=True)
    assert again.resumed_from == 3
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight).values(), _weights(resumed).values(), strict=True))


def test_ctrl_c_during_the_optimizer_update_waits_for_the_update(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's Ctrl-C, even in a background job
    try:
        _interrupt_during_update(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_during_update(tmp_path):
    config = ToyConfig()
    task, straight = toy(config, Runtime())
    done = fit(task, config, Runtime())
    task, resumed = toy(config, Runtime())
    real_step, calls = task.optimizer.step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)  # arrives while the weights are being updated
        return real_step(*args, **kwargs)

    task.optimizer.step = step_then_signal
    with pytest.raises(TrainingInterrupted):
        fit(task, config, Runtime(), checkpoint=tmp_path / "c")
    assert load_checkpoint(tmp_path / "c")["step"] == 4  # the update finished and was counted
    task, resumed = toy(config, Runtime())
    again = fit(task, config, Runtime(), checkpoint=tmp_path / "c", resume=True)
    assert again.history == done.history
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight).values(), _weights(resumed).values(), strict=True))


def test_resume_with_other_settings_is_a_one_line_error(tmp_path):
    task, _ = toy(ToyConfig(), Runtime())
    fit(task, ToyConfig(), Runtime(), checkpoint=tmp_path / "c")
    task, _ = toy(ToyConfig(steps=8), Runtime())
    assert fit(task, ToyConfig(steps=8), Runtime(), checkpoint=tmp_path / "c", resume=True).step == 8  # train longer
    task, _ = toy(ToyConfig(lr=0.1), Runtime())
    with pytest.raises(LeanfmError) as caught:
        fit(task, ToyConfig(lr=0.1), Runtime(), checkpoint=tmp_path / "c", resume=True)
    assert "was trained with lr=0.05, not 0.1" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("content", "message"), [(b"not a checkpoint", "cannot be read"), (None, "older leanfm")])
def test_unreadable_or_old_checkpoints_are_one_line_errors(tmp_path, content, message):
    folder = tmp_path / "c"
    folder.mkdir()
    if content is None:
        torch.save({"hypernetwork": {}, "step": 3}, folder / STATE_FILE)  # a pre-fit layout
    else:
        (folder / STATE_FILE).write_bytes(content)
    task, _ = toy(ToyConfig(), Runtime())
    with pytest.raises(LeanfmError, match=message) as caught:
        fit(task, ToyConfig(), Runtime(), checkpoint=folder, resume=True)
    assert "\n" not in str(caught.value) and "--overwrite" in str(caught.value)


def test_the_resume_overwrite_rule(tmp_path):
    out = tmp_path / "run"
    assert prepare_run(out, resume=False, overwrite=False) == checkpoint_path(out) == tmp_path / "run.training"
    assert not checkpoint_path(out).exists()
    checkpoint_path(out).mkdir()
    (checkpoint_path(out) / STATE_FILE).write_bytes(b"x")
    with pytest.raises(LeanfmError) as caught:
        prepare_run(out, resume=False, overwrite=False)
    assert "pass --resume to continue it or --overwrite to start over" in str(caught.value)
    assert prepare_run(out, resume=True, overwrite=False).is_dir()  # resume keeps it
    assert prepare_run(out, resume=True, overwrite=True).is_dir()  # resume wins: replace OUT, continue training
    prepare_run(out, resume=False, overwrite=True)
    assert not checkpoint_path(out).exists()  # overwrite discards it
    out.mkdir()
    (out / "notes.txt").write_text("not ours")
    with pytest.raises(LeanfmError, match="exists and is not empty; pass --overwrite"):
        prepare_run(out, resume=True, overwrite=False)
    assert prepare_run(out, resume=False, overwrite=True, checkpoint=tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_warmup_then_cosine():
    assert [warmup_cosine(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert warmup_cosine(2, 10, 2) == 1.0 and warmup_cosine(10, 10, 2) == pytest.approx(0.0)
    assert warmup_cosine(6, 10, 2) == pytest.approx(0.5)


def test_a_parameter_group_with_lr_scale_follows_the_schedule_times_its_scale():
    config = ToyConfig(steps=3)
    task, model = toy(config, Runtime())
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    task.optimizer = torch.optim.AdamW([{"params": first}, {"params": second, "lr_scale": 10.0}], lr=config.lr)
    seen = []
    real = task.optimizer.step

    def step(*args, **kwargs):
        seen.append([g["lr"] for g in task.optimizer.param_groups])
        return real(*args, **kwargs)

    task.optimizer.step = step  # type: ignore[method-assign]
    fit(task, config, Runtime())
    schedule = warmup_cosine_lr(config.lr, config.steps, 2)
    assert seen == [[pytest.approx(schedule(s)), pytest.approx(10 * schedule(s))] for s in range(3)]
