"""llmkit.bench: each row says how to measure it again and where it was measured; speed checks as ratios."""

import shlex

import pytest
import torch

from llmkit.bench import SPEED_ORDER, bench, check_speed_order, table
from llmkit.cli import build_parser
from llmkit.errors import LLMKitError


def test_a_row_carries_the_command_that_measures_it_again_and_the_machine(tmp_path):
    torch.set_num_threads(1)
    (row,) = bench("default", ["none"], ["eager"], prompt_len=4, new_tokens=4, repeats=1, workdir=tmp_path)
    argv = shlex.split(row["command"])
    assert argv[0] == "llmkit"
    args = build_parser().parse_args(argv[1:])
    assert (args.checkpoint_path, args.quantize, args.path, args.threads) == ("default", ["none"], ["eager"], 1)
    assert (args.prompt_len, args.new_tokens, args.repeats, args.dtype) == (4, 4, 1, "float32")
    assert row["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert row["cpu"] and row["cpu_count"] >= 1 and row["llmkit"] and row["load_average"] >= 0
    assert row["commit"] is None or len(row["commit"].removesuffix("-dirty")) >= 7


def rows(speeds: dict) -> list[dict]:
    return [{"scheme": s, "path": p, "decode_tokens_per_s": v} for (s, p), v in speeds.items()]


def test_speed_checks_are_ratios_of_one_run():
    speeds = {key: 100.0 for pair in SPEED_ORDER for key in pair}
    speeds["none", "compile"] = 250.0
    speeds["int8wo", "compile"] = 500.0
    checks = {(c.faster, c.slower): c for c in check_speed_order(rows(speeds))}
    assert checks[("none", "compile"), ("none", "eager")].ratio == pytest.approx(2.5)
    assert checks[("none", "compile"), ("none", "eager")].holds
    assert checks[("int8wo", "compile"), ("none", "compile")].ratio == pytest.approx(2.0)
    assert not checks[("int8wo", "aoti"), ("none", "compile")].holds  # 100 vs 250


def test_a_speed_check_without_its_measurement_says_what_is_missing():
    with pytest.raises(LLMKitError, match="int8wo"):
        check_speed_order(rows({("none", "eager"): 1.0, ("none", "compile"): 2.0}),
                          order=((("int8wo", "compile"), ("none", "compile")),))  # fmt: skip


def test_a_compile_that_fell_back_to_eager_is_recorded_not_passed_off_as_compiled(tmp_path, monkeypatch):
    """Where torch.compile fails, llmkit.compile runs eager: the row says so, the table marks it, and the speed
    checks refuse to compare it as a compiled figure."""

    def compile_that_fails(fn, **options):
        def compiled(*args):
            raise RuntimeError("inductor can't lower this\nsecond line")

        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    with pytest.warns(UserWarning, match="running eager"):
        (row,) = bench("default", ["none"], ["compile"], prompt_len=4, new_tokens=4, repeats=1, workdir=tmp_path)
    assert row["path"] == "compile" and row["compile_fallback"] == "inductor can't lower this"
    assert "| compile (failed, ran eager) |" in table([row])
    with pytest.raises(LLMKitError, match="could not be compiled and ran eager"):
        check_speed_order([row, {**row, "path": "eager", "compile_fallback": None}],
                          order=((("none", "compile"), ("none", "eager")),))  # fmt: skip
