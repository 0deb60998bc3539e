"""Typed config: defaults, YAML layers, `--set` overrides, key and type errors, safe YAML, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from metatransfer.config import (
    Config,
    build_config,
    load_config,
    parse_override,
    read_yaml,
    to_dict,
    to_yaml,
)
from metatransfer.device import cpu_has_bf16, eval_mode, resolve_runtime
from metatransfer.errors import ConfigError, UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_load() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.meta.way, cfg.meta.shot, cfg.meta.query) == (5, 1, 15)
    assert cfg.eval.shots == [1, 5] and cfg.meta.ht.enabled is False


def test_config_error_is_a_user_error() -> None:
    assert issubclass(ConfigError, UserError)  # so the CLI prints one line and exits 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    # Every value the file sets is the config's (nothing ignored or silently converted).
    for key, value in _leaves(read_yaml(path)):
        node: Any = cfg
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert node == value, key


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """("a.b", value) for every non-mapping value of a nested mapping (backbone_args stays whole)."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and k != "backbone_args":
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def test_yaml_layers_apply_in_order_and_merge_nested_sections(tmp_path: Path) -> None:
    base = write(tmp_path, "name: base\nmeta:\n  way: 10\n  shot: 5\n  ht: {enabled: true}\n", "base.yaml")
    top = write(tmp_path, "meta:\n  way: 20\n  ht: {tasks_per_batch: 3}\n", "top.yaml")
    cfg = build_config([read_yaml(base), read_yaml(top)])
    assert cfg.name == "base"
    assert (cfg.meta.way, cfg.meta.shot) == (20, 5)  # later layer wins, siblings kept
    assert (cfg.meta.ht.enabled, cfg.meta.ht.tasks_per_batch) == (True, 3)
    assert cfg.meta.query == 15  # untouched keys keep their defaults


def test_overrides_come_last_and_parse_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path, "meta: {way: 10}\npretrain: {images_per_epoch: 5000}\n")
    cfg = load_config(
        path,
        [
            "meta.way=20",
            "eval.shots=[1, 5, 10]",
            "meta.ht.enabled=true",
            "pretrain.images_per_epoch=null",
            "data.root=/some/where",
            "model.backbone_args={widths: [4, 8]}",
            "name=",
        ],
    )
    assert cfg.meta.way == 20
    assert cfg.eval.shots == [1, 5, 10]
    assert cfg.meta.ht.enabled is True
    assert cfg.pretrain.images_per_epoch is None
    assert cfg.data.root == "/some/where"
    assert cfg.model.backbone_args == {"widths": [4, 8]}
    assert cfg.name == ""


def test_parse_override() -> None:
    assert parse_override("meta.way=20") == (["meta", "way"], 20)
    assert parse_override(" data.root = a=b ") == (["data", "root"], "a=b")
    assert parse_override("eval.ways=[5, 20]") == (["eval", "ways"], [5, 20])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("meta.way")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("eval.shots=[1, 5")


@pytest.mark.parametrize(
    "layer,override,key",
    [
        ({"meta": {"wya": 5}}, None, "meta.wya"),
        (None, "meta.wya=5", "meta.wya"),
        (None, "meta.ht.enabeld=true", "meta.ht.enabeld"),
        ({"epochs": 3}, None, "epochs"),
    ],
)
def test_unknown_key_is_named(layer: dict | None, override: str | None, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config([layer] if layer else [], [override] if override else [])
    message = str(info.value)
    assert f"'{key}'" in message and "unknown" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "override,key,expected",
    [
        ("pretrain.epochs=ten", "pretrain.epochs", "int"),
        ("meta.ht.enabled=1", "meta.ht.enabled", "bool"),
        ("eval.shots=[1, a]", "eval.shots[1]", "int"),
        ("pretrain.epochs=true", "pretrain.epochs", "int"),
        ("meta.inner_lr=true", "meta.inner_lr", "float"),
        ("meta.inner_lr=0.1x", "meta.inner_lr", "float"),
        ("eval.shots=5", "eval.shots", "list"),
        ("meta=5", "meta", "mapping"),
        ("pretrain.images_per_epoch=many", "pretrain.images_per_epoch", "int or null"),
        ("model.backbone_args=[1]", "model.backbone_args", "mapping"),
        ("data.dataset=null", "data.dataset", "str"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config([], [override])
    message = str(info.value)
    assert f"'{key}'" in message
    assert f"expects {expected}" in message or f"expects a {expected}" in message


def test_wrong_type_in_a_yaml_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'pretrain:\n  epochs: "ten"\n')
    with pytest.raises(ConfigError, match=r"'pretrain\.epochs' expects int"):
        load_config(path)


def test_int_is_widened_to_float() -> None:
    cfg = build_config([{"meta": {"inner_lr": 1}, "pretrain": {"augment": {"crop_scale": [1, 1]}}}])
    assert cfg.meta.inner_lr == 1.0 and type(cfg.meta.inner_lr) is float
    assert cfg.pretrain.augment.crop_scale == [1.0, 1.0]
    assert all(type(v) is float for v in cfg.pretrain.augment.crop_scale)


@pytest.mark.parametrize(
    "override,key",
    [
        ("pretrain.schedule=linear", "pretrain.schedule"),
        ("precision=fp8", "precision"),
        ("meta.bn=learn", "meta.bn"),
        ("data.on_bad_image=ignore", "data.on_bad_image"),
    ],
)
def test_invalid_choice_is_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}' is .*choose one of"):
        build_config([], [override])


def test_python_object_tag_is_refused_and_not_run(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    path = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {sentinel}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(path)
    assert not sentinel.exists()
    path = write(tmp_path, "name: !!python/object:metatransfer.config.Config {}\n", "obj.yaml")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


@pytest.mark.parametrize(
    "text,match",
    [
        ("meta: [way\n", "not valid YAML"),
        ("- 1\n- 2\n", "mapping of keys at the top level"),
    ],
)
def test_bad_yaml_file_is_named(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        read_yaml(path)
    assert str(path) in str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    assert load_config(write(tmp_path, "")) == Config()


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = build_config(
        # strings YAML would read as a bool and None; a float YAML writes in exponent form
        [{"name": "yes", "data": {"cache_dir": "null"}, "meta": {"inner_lr": 1e-5}}],
        [
            "data.root=/data/x",
            "meta.ht.enabled=true",
            "eval.ways=[5, 20]",
            "model.backbone_args={widths: [4, 8, 16], slope: 0.2}",
            "pretrain.images_per_epoch=1000",
        ],
    )
    path = write(tmp_path, to_yaml(cfg), "config.yaml")
    again = build_config([read_yaml(path)])
    assert again == cfg
    assert to_dict(again) == dataclasses.asdict(cfg)
    assert to_yaml(again) == to_yaml(cfg)


@pytest.mark.parametrize("text,value", [("1e-5", 1e-5), ("5E-4", 5e-4), ("2e3", 2000.0), ("1.0e-3", 1e-3)])
def test_exponent_floats_without_a_dot_are_floats(tmp_path: Path, text: str, value: float) -> None:
    # PyYAML (YAML 1.1) reads `1e-5` as a string; learning rates are usually written that way.
    assert build_config([], [f"meta.temperature={text}"]).meta.temperature == value
    assert load_config(write(tmp_path, f"meta:\n  temperature: {text}\n")).meta.temperature == value


# --- device and precision (resolve_runtime) ---------------------------------------------------------------


def test_fp16_on_cpu_is_allowed_with_a_grad_scaler() -> None:
    rt = resolve_runtime(build_config([], ["device=cpu", "precision=fp16"]))
    assert rt.amp_dtype is torch.float16 and rt.grad_scaler().is_enabled()
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_refused(device: str) -> None:
    with pytest.raises(ConfigError, match="'device' asks for cuda.*device=cpu"):
        resolve_runtime(build_config([], [f"device={device}"]))


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ConfigError, match="'device' is 'gpu0'"):
        resolve_runtime(build_config([], ["device=gpu0"]))


@pytest.mark.parametrize("precision,dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_explicit_cpu_precision(precision: str, dtype: torch.dtype | None) -> None:
    rt = resolve_runtime(build_config([], ["device=cpu", f"precision={precision}", "channels_last=false"]))
    assert rt.device == torch.device("cpu")
    assert rt.amp_dtype is dtype and rt.precision == precision and rt.channels_last is False


def test_auto_precision_on_cpu_follows_native_bf16() -> None:
    rt = resolve_runtime(build_config([], ["device=cpu"]))
    assert rt.precision == ("bf16" if cpu_has_bf16() else "fp32")  # never fp16, which CPUs run slowly
    assert not rt.grad_scaler().is_enabled()


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_auto_precision_is_bf16_on_a_bf16_cpu() -> None:
    rt = resolve_runtime(build_config([], ["device=cpu"]))
    assert rt.amp_dtype is torch.bfloat16
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_fp32_autocast_is_a_no_op_and_channels_last_applies() -> None:
    rt = resolve_runtime(build_config([], ["device=cpu", "precision=fp32"]))
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert rt.images(torch.zeros(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)


def test_eval_mode_restores_training_mode() -> None:
    net = torch.nn.Sequential(torch.nn.Dropout(0.5))
    net.train()
    with eval_mode(net):
        assert not net.training
    assert net.training
    with pytest.raises(RuntimeError), eval_mode(net):
        raise RuntimeError("boom")
    assert net.training  # restored even when the body raises


def test_per_filter_scale_with_batch_statistics_is_refused() -> None:
    # BN with batch statistics divides a per-filter scale out: SS would learn nothing.
    with pytest.raises(ConfigError, match="ss_granularity 'filter' with meta.bn 'batch'") as info:
        build_config([], ["meta.bn=batch"])
    assert "\n" not in str(info.value)
    build_config([], ["meta.bn=batch", "meta.ss_granularity=kernel"])
    build_config([], ["meta.bn=train"])  # running statistics: the per-filter scale acts
    build_config([], ["meta.bn=batch", "meta.method=ft-last"])  # no SS: the granularity is unused
