"""Property: every numeric config key, set to 0, a negative, a huge number, NaN/inf or a wrong type,
makes `mtl run` either refuse it (exit 2, one line naming the key, no traceback) or succeed.

The keys come from the config dataclasses (`numeric_keys`), so a key added there is covered here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from metatransfer.cli import main
from metatransfer.config import numeric_keys

from tiny import write_config, write_pattern_folder

KEYS = dict(numeric_keys())


BAD_NUMBERS = st.one_of(
    st.sampled_from([0, 0.0]),
    st.integers(max_value=-1),
    st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
    st.integers(min_value=2**64),
    st.sampled_from([1e300, float("inf"), float("-inf"), float("nan")]),
    st.sampled_from(["abc", "", True, None, {"a": 1}]),
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A config whose whole `mtl run` takes about a second, and a place for outputs."""
    tmp = tmp_path_factory.mktemp("property")
    data = write_pattern_folder(tmp / "data", per_class=6)
    config = write_config(
        tmp / "tiny.yaml",
        data,
        tmp / "cache",
        pretrain={"epochs": 1, "val_episodes": 2, "val_shots": [1]},
        meta={
            "tasks": 2,
            "val_every": 2,
            "val_episodes": 2,
            "inner_steps": 2,
            "inner_steps_test": 2,
            "query": 2,
        },
    )
    cfg = yaml.safe_load(config.read_text())
    cfg["eval"].update(episodes=2, query=2, shots=[1])
    config.write_text(yaml.safe_dump(cfg))
    return {"config": config, "out": tmp / "runs", "outcomes": {}}


def _override(key: str, value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"


@pytest.mark.parametrize("key", sorted(KEYS))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=BAD_NUMBERS, as_list=st.booleans())
@example(value=0, as_list=False)
@example(value=0, as_list=True)
@example(value=-1, as_list=False)
@example(value=2**64, as_list=True)
@example(value=float("nan"), as_list=False)
@example(value="abc", as_list=False)
def test_a_bad_number_is_refused_in_one_line_or_runs(
    key: str, value: Any, as_list: bool, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`as_list` puts the value in a list: a list key's item, or a wrong type for a scalar key."""
    override = _override(key, [value] if as_list else value)
    outcomes: dict[str, int] = tiny["outcomes"]
    if override in outcomes:  # an accepted value already ran once; running it again shows nothing new
        return
    out = Path(tiny["out"]) / f"{len(outcomes)}"
    capsys.readouterr()
    code = main(["run", "--config", str(tiny["config"]), "--out", str(out), "--set", override])
    err = capsys.readouterr().err
    outcomes[override] = code
    if code == 0:
        assert (out / "summary.json").exists(), override
        return
    lines = [line for line in err.splitlines() if line.startswith("mtl:") or "Traceback" in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mtl: error:"), (override, err)
    assert key in lines[0] and len(lines[0]) < 400, (override, lines[0])
