"""Run files: atomic writes under failure, safetensors-only weights, refusal of pickled code, the run
directory lock, finished/resumed runs, and the metrics CSV."""

from __future__ import annotations

import errno
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from metatransfer.config import Config, build_config, to_yaml
from metatransfer.errors import UserError
from metatransfer.runs import (
    MetricsLog,
    RunDir,
    atomic_write_bytes,
    atomic_write_text,
    is_finished,
    load_state,
    load_weights,
    read_json,
    save_state,
    save_weights,
    write_json,
)


def _fail(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _leftovers(folder: Path, keep: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - keep


# --- atomic writes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    target = tmp_path / "ckpt.safetensors"
    atomic_write_bytes(target, b"old contents")
    if fail_at == "write":
        real_fdopen = os.fdopen

        class DiskFull(io.BufferedWriter):
            def write(self, data: object) -> int:
                super().write(b"half")  # a partial write reaches the temp file before the disk fills
                raise OSError(errno.ENOSPC, "No space left on device")

        def fdopen(fd: int, mode: str = "r", *args: object, **kwargs: object) -> io.BufferedWriter:
            raw = real_fdopen(fd, mode, buffering=0)
            return DiskFull(raw)

        monkeypatch.setattr(os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(os, fail_at, _fail)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"new contents that never fully land")
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert _leftovers(tmp_path, {"ckpt.safetensors"}) == set()


def test_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _fail)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "sub" / "metrics.csv", "a,b\n")
    assert list((tmp_path / "sub").iterdir()) == []


def test_interrupt_during_write_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_json(target, {"a": 2})
    monkeypatch.undo()
    assert read_json(target) == {"a": 1}
    assert _leftovers(tmp_path, {"x.json"}) == set()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_mode_open_would(tmp_path: Path, umask: int) -> None:
    """Not mkstemp's 0600: run files are readable by whoever the user's umask lets read them."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "summary.md", "x")
        with (tmp_path / "plain.md").open("w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = (tmp_path / "summary.md").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.md").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_replaces_contents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert _leftovers(target.parent, {"b.txt"}) == set()


def test_read_json_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing file"):
        read_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(UserError, match=r"bad\.json is not valid JSON"):
        read_json(bad)


# --- weights and resume state ----------------------------------------------------------------------------


def test_weights_round_trip_with_metadata(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 4).t(),  # non-contiguous on purpose
        "b": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(2, dtype=torch.bfloat16),
    }
    meta = {"backbone": "conv4", "preprocess": '{"size": 28}'}
    path = tmp_path / "m.safetensors"
    save_weights(path, tensors, meta)
    loaded, loaded_meta = load_weights(path)
    assert loaded_meta == meta
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype
        assert torch.equal(loaded[k], v)
    save_weights(path, {"x": torch.ones(1)})
    assert load_weights(path)[1] == {}


def test_weights_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", b"\xff" * 16]
)
def test_weights_reject_corrupt_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a safetensors file"):
        load_weights(path)


def test_weights_reject_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(path, {"w": torch.randn(64, 64)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="not a safetensors file"):
        load_weights(path)


def test_weights_reject_a_torch_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.randn(2, 2)}, path)
    with pytest.raises(UserError, match="not a safetensors file"):
        load_weights(path)


def test_weights_path_that_is_a_folder_is_a_user_error(tmp_path: Path) -> None:
    # e.g. `--pretrained runs/x` where a file was expected: one line, not an IsADirectoryError traceback
    with pytest.raises(UserError, match=str(tmp_path)):
        load_weights(tmp_path)


class Exploit:
    """A pickle payload that runs a shell command when unpickled (harmless here: it touches a file)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("loader", [load_weights, load_state], ids=["load_weights", "load_state"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickled_code_is_refused_and_never_runs(tmp_path: Path, loader: object, writer: str) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"optimizer": Exploit(sentinel)}, protocol=2))
    else:
        torch.save({"optimizer": Exploit(sentinel)}, path)
    assert not sentinel.exists()
    with pytest.raises(UserError) as info:
        loader(path)  # type: ignore[operator]
    assert not sentinel.exists()
    if loader is load_state:
        assert "refusing" in str(info.value)
        assert str(path) in str(info.value)


class Custom:
    def __init__(self) -> None:
        self.x = 1


def test_state_with_a_custom_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"thing": Custom()}, path)
    with pytest.raises(UserError, match="refusing"):
        load_state(path)


def test_state_round_trip_of_real_resume_contents(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    rng = torch.get_rng_state()
    state = {
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "best": 0.5,
        "failures": {"7": 2},
        "rng": rng,
    }
    path = tmp_path / "state.pt"
    save_state(path, state)
    loaded = load_state(path)
    assert loaded["epoch"] == 3 and loaded["best"] == 0.5 and loaded["failures"] == {"7": 2}
    assert torch.equal(loaded["rng"], rng)
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], exp_avg)


def test_state_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_state(tmp_path / "state.pt")
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(UserError, match="does not hold a metatransfer resume state"):
        load_state(path)


# --- run directories --------------------------------------------------------------------------------------


def cfg(**meta: int) -> Config:
    return build_config([{"name": "t", "meta": dict(meta)}])


def test_second_opener_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    run = RunDir.open(tmp_path / "run", cfg(), "meta")
    with pytest.raises(UserError, match="in use"):
        RunDir.open(tmp_path / "run", cfg(), "meta")
    with pytest.raises(UserError, match="in use"):  # the failed attempt did not release the first lock
        RunDir.open(tmp_path / "run", cfg(), "meta")
    run.close()
    with RunDir.open(tmp_path / "run", cfg(), "meta") as again:
        assert again.path == tmp_path / "run"


def test_lock_is_released_when_open_fails(tmp_path: Path) -> None:
    with RunDir.open(tmp_path, cfg(), "meta") as run:
        run.finish()
    with pytest.raises(UserError, match="finished run"):
        RunDir.open(tmp_path, cfg(), "meta")
    RunDir.open(tmp_path, cfg(), "meta", overwrite=True).close()  # would say "in use" if the lock had leaked


def test_fresh_run_writes_its_config(tmp_path: Path) -> None:
    with RunDir.open(tmp_path / "r", cfg(way=7), "meta") as run:
        assert run.resuming is False
        assert build_config([__import__("yaml").safe_load(run.file("config.yaml").read_text())]).meta.way == 7


def test_finished_run_is_not_overwritten_without_overwrite(tmp_path: Path) -> None:
    with RunDir.open(tmp_path, cfg(), "meta") as run:
        atomic_write_bytes(run.file("backbone.safetensors"), b"precious")
        run.finish({"best_val": 0.9})
    with pytest.raises(UserError, match="finished run.*--overwrite"):
        RunDir.open(tmp_path, cfg(), "meta")
    with pytest.raises(UserError, match="finished run"):
        RunDir.open(tmp_path, cfg(way=10), "meta")
    assert (tmp_path / "backbone.safetensors").read_bytes() == b"precious"
    with RunDir.open(tmp_path, cfg(way=10), "meta", overwrite=True) as run:
        assert run.resuming is False
    assert not (tmp_path / "backbone.safetensors").exists()
    assert not (tmp_path / "DONE").exists()
    assert is_finished(tmp_path, cfg(way=10), "meta") is False


def test_overwrite_removes_only_what_the_run_wrote(tmp_path: Path) -> None:
    with RunDir.open(tmp_path / "run", cfg(), "meta") as run:
        save_weights(run.file("backbone.safetensors"), {"w": torch.ones(2)})
        (run.path / "notes.txt").write_text("mine")  # the user's, added to the run folder
        (run.path / "plots").mkdir()
        run.finish()
    with RunDir.open(tmp_path / "run", cfg(), "meta", overwrite=True):
        pass
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".lock",
        ".metatransfer.json",
        ".metatransfer.lock",
        "config.yaml",
        "notes.txt",
        "plots",
    ]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_metatransfer_did_not_write_is_refused_and_kept(tmp_path: Path, overwrite: bool) -> None:
    folder = tmp_path / "thesis"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i}.png").write_bytes(b"png %d" % i)
    (folder / "thesis.txt").write_text("years of work")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserError, match="did not write"):
        RunDir.open(folder, cfg(), "meta", overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_an_output_inside_the_dataset_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "train" / "class0").mkdir(parents=True)
    (data / "train" / "class0" / "0.png").write_bytes(b"png")
    config = build_config([{"data": {"dataset": "image-folder", "root": str(data)}}])
    for out in (data, data / "train" / "class0", data / "new"):
        with pytest.raises(UserError, match="inside the dataset folder"):
            RunDir.open(out, config, "meta", overwrite=True)
    assert sorted(p.name for p in data.rglob("*")) == ["0.png", "class0", "train"]


def test_a_run_written_before_the_marker_is_still_ours(tmp_path: Path) -> None:
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "config.yaml").write_text(to_yaml(cfg()))
    (legacy / "backbone.safetensors").write_bytes(b"old weights")
    (legacy / "DONE").write_text("{}")
    (legacy / "readme.txt").write_text("the user's")
    with RunDir.open(legacy, cfg(way=10), "meta", overwrite=True):
        pass
    assert sorted(p.name for p in legacy.iterdir()) == [
        ".lock",
        ".metatransfer.json",
        ".metatransfer.lock",
        "config.yaml",
        "readme.txt",
    ]
    # A config.yaml that is not exactly what metatransfer writes does not make a folder ours.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("name: mine\n")
    with pytest.raises(UserError, match="did not write"):
        RunDir.open(other, cfg(), "meta", overwrite=True)
    assert (other / "config.yaml").read_text() == "name: mine\n"


def test_an_output_that_is_a_file_or_unwritable_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        RunDir.open(tmp_path / "file", cfg(), "meta")
    with pytest.raises(UserError, match=r"cannot create the output folder .*file/run: Not a directory"):
        RunDir.open(tmp_path / "file" / "run", cfg(), "meta")


def test_resume_detection(tmp_path: Path) -> None:
    with RunDir.open(tmp_path, cfg(), "meta") as run:
        assert run.resuming is False
        save_state(run.file("state.pt"), {"epoch": 1})
    with RunDir.open(tmp_path, cfg(), "meta") as run:  # same config + state: resumed automatically
        assert run.resuming is True
    with RunDir.open(tmp_path, cfg(), "meta", resume=True) as run:
        assert run.resuming is True
    with pytest.raises(UserError, match="different config"):
        RunDir.open(tmp_path, cfg(way=10), "meta")
    with pytest.raises(UserError, match="--resume"):
        RunDir.open(tmp_path, cfg(), "meta", resume=False)
    with RunDir.open(tmp_path, cfg(way=10), "meta", overwrite=True) as run:
        assert run.resuming is False
    assert not (tmp_path / "state.pt").exists()


def test_resume_without_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        RunDir.open(tmp_path / "empty", cfg(), "meta", resume=True)


def test_unfinished_run_without_state_restarts(tmp_path: Path) -> None:
    RunDir.open(tmp_path, cfg(), "meta").close()  # crashed before its first checkpoint
    with RunDir.open(tmp_path, cfg(way=10), "meta") as run:
        assert run.resuming is False
    assert "way: 10" in (tmp_path / "config.yaml").read_text()


def test_is_finished_and_finish_drops_resume_state(tmp_path: Path) -> None:
    assert is_finished(tmp_path, cfg(), "meta") is False
    with RunDir.open(tmp_path, cfg(), "meta") as run:
        save_state(run.file("state.pt"), {"epoch": 1})
        save_state(run.file("state_meta.pt"), {"tasks": 2})
        assert is_finished(tmp_path, cfg(), "meta") is False
        run.finish({"best_val": 0.5})
    assert is_finished(tmp_path, cfg(), "meta") is True
    assert is_finished(tmp_path, cfg(way=10), "meta") is False
    assert read_json(tmp_path / "DONE") == {"best_val": 0.5}
    assert list(tmp_path.glob("state*.pt")) == []


def test_a_finished_phase_is_reused_when_only_settings_it_never_reads_changed(tmp_path: Path) -> None:
    base = build_config([{"name": "t", "eval": {"split": "val"}}])
    with RunDir.open(tmp_path, base, "pretrain") as run:
        run.finish()

    def changed(**sections: object) -> Config:
        return build_config([{"name": "t", "eval": {"split": "val"}}, sections])

    # (change, still the same pre-training?, still the same meta-training?)
    cases = [
        (changed(meta={"inner_lr": 0.02, "ss_granularity": "kernel"}), True, False),
        (changed(eval={"episodes": 5000, "ways": [5, 20], "split": "test", "seed": 3}), True, True),
        (changed(logging={"tensorboard": True}), True, True),
        (changed(eval={"query": 10}), False, True),  # pretrain's val episodes use eval.query
        (changed(eval={"selection_seed": 7}), False, False),  # both select on these episodes
        (changed(pretrain={"epochs": 3}), False, False),
        (changed(seed=5), False, False),
    ]
    for cfg_b, pretrain_same, meta_same in cases:
        assert is_finished(tmp_path, cfg_b, "pretrain") is pretrain_same, to_yaml(cfg_b)
        assert is_finished(tmp_path, cfg_b, "meta") is meta_same, to_yaml(cfg_b)
    (tmp_path / "config.yaml").write_text("meta: {no_such_key: 1}\n")  # written by another version
    assert is_finished(tmp_path, base, "pretrain") is False


def test_an_unfinished_pretraining_resumes_after_the_meta_section_changed(tmp_path: Path) -> None:
    with RunDir.open(tmp_path, cfg(), "pretrain") as run:
        save_state(run.file("state.pt"), {"epoch": 1})
    with RunDir.open(tmp_path, cfg(way=10), "pretrain") as run:
        assert run.resuming is True
    with pytest.raises(UserError, match="different config"):
        RunDir.open(tmp_path, cfg(way=7), "meta")


# --- metrics CSV ------------------------------------------------------------------------------------------


def test_metrics_columns_are_the_union_in_first_seen_order(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.csv")
    log.append({"step": 1, "loss": 0.5})
    log.append({"step": 2, "val_acc": 0.123456789, "loss": 0.25})
    assert (tmp_path / "metrics.csv").read_text() == "step,loss,val_acc\n1,0.5,\n2,0.25,0.123457\n"


def test_metrics_resume_keeps_rows_up_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.append({"step": step, "acc": step / 10})
    resumed = MetricsLog(path, resume=True, keep_until=3)
    assert [r["step"] for r in resumed.rows] == ["1", "2", "3"]
    resumed.append({"step": 4, "acc": 0.44, "extra": 1})
    assert path.read_text() == "step,acc,extra\n1,0.1,\n2,0.2,\n3,0.3,\n4,0.44,1\n"
    assert len(MetricsLog(path, resume=True).rows) == 4  # no keep_until: every row kept


def test_metrics_without_resume_start_over(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    MetricsLog(path).append({"step": 1})
    log = MetricsLog(path)
    assert log.rows == []
    log.append({"step": 9})
    assert path.read_text() == "step\n9\n"


def test_a_folder_left_by_a_process_killed_while_marking_it_is_reused(tmp_path: Path) -> None:
    """SIGKILL during `claim_folder` leaves the marker's temporary file and no marker (found by the
    start-up kill of tests/test_resume.py); the next run must take the folder, not refuse it as foreign."""
    from metatransfer.runs import MARKER_FILE, check_output, claim_folder

    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".{MARKER_FILE}.0123456789ab.tmp"
    stale.write_text('{"format": "metatransfer-out')
    assert check_output(out) == out
    claim_folder(out)
    assert (out / MARKER_FILE).exists() and not stale.exists()
