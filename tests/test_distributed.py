"""Tensor parallelism on the CPU: two gloo ranks decode what one process decodes, --tp's bad input fails in one
line before any rank starts, and a rank that dies stops the others instead of leaving them waiting."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit import cli, distributed
from llmkit.errors import LLMKitError

sys.path.insert(0, str(Path(__file__).parent))
import tp_worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = ["default", "gqa", "gqa-compile", "default-compile"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Every run's greedy tokens and logits from two ranks, started by llmkit's own launcher (one start for all)."""
    out = tmp_path_factory.mktemp("tp") / "two.pt"
    assert distributed.launch([sys.executable, str(REPO / "tests" / "tp_worker.py"), str(out), "2", *RUNS], 2) == 0
    return torch.load(out)


@pytest.mark.parametrize("run", RUNS)
def test_two_ranks_decode_what_one_process_decodes(two_ranks, run, tmp_path):
    tp_worker.main(str(tmp_path / "one.pt"), 1, [run.split("-")[0]])  # the reference: one process, eager
    tokens, logits = torch.load(tmp_path / "one.pt")[run.split("-")[0]]
    split_tokens, split_logits = two_ranks[run]
    assert split_tokens == tokens
    # the all-reduces add the two halves of each product in another order than one process's sum: float32 rounding
    assert (split_logits - logits).abs().max() < 1e-5


def test_a_split_model_is_not_quantized(two_ranks):
    assert "torchao 0.18's quantized weights do not compose with DTensor" in two_ranks["quantize"]
    assert "pytorch/ao#988" in two_ranks["quantize"]


def llmkit_run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmkit", *argv], capture_output=True, text=True, timeout=timeout)


def test_generate_tp_2_prints_the_text_of_one_process():
    argv = ["generate", "--prompt", "The built-in function", "--max-new-tokens", "24", "--temperature", "0",
            "--max-seq-len", "64"]  # fmt: skip
    one, two = llmkit_run(*argv), llmkit_run(*argv, "--tp", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout  # once: the second rank prints nothing
    assert len(one.stdout) > len("The built-in function") + 20


def test_serve_tp_2_replies_as_one_process_and_stops_on_sigterm(tmp_path):
    """`llmkit serve --tp 2`: rank 0 serves and both ranks make each model call; concurrent greedy requests (batched,
    prefilled together) get one process's text, and SIGTERM stops both ranks with status 0."""
    import asyncio

    import openai

    import llmkit
    from llmkit.serve import ServerProcess

    prompts, lengths = ["The built-in function", "A list is", "Raises ValueError if"], [20, 7, 13]
    reference = llmkit.load("default", max_seq_len=64)
    alone = [reference.generate(p, max_new_tokens=n, temperature=0).text for p, n in zip(prompts, lengths, strict=True)]
    log = tmp_path / "server.log"
    with ServerProcess(["--tp", "2", "--max-batch-size", "4", "--max-seq-len", "64"], log=log) as server:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        model = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none").models.list().data[0].id

        async def all_at_once():
            return await asyncio.gather(*(client.completions.create(model=model, prompt=p, max_tokens=n, temperature=0)
                                          for p, n in zip(prompts, lengths, strict=True)))  # fmt: skip

        replies = asyncio.run(all_at_once())
        assert [r.choices[0].text for r in replies] == alone, log.read_text()
        assert server.stop() == 0, log.read_text()


@pytest.mark.parametrize(("argv", "says"), [
    (["generate", "--tp", "3"], "--tp 3 does not split the model's 8 query heads and 2 key/value heads"),
    (["bench", "--shape", "stories15M", "--tp", "4"], "--tp 4 does not split the model's 6 query heads"),
    (["generate", "--tp", "2", "--quantize", "int8wo"], "pytorch/ao#988"),
    (["export", "--tp", "2", "--output-pte-path", "m.pte"], "--tp is not supported by export yet"),
    (["generate", "--tp", "2", "--draft-checkpoint-path", "data/pydoc-lm-draft"], "--draft-checkpoint-path"),
])  # fmt: skip
def test_bad_tp_fails_in_one_line_before_any_rank_starts(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("a rank was started"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs a machine with fewer than 2 GPUs")
def test_tp_beyond_the_gpus_present_fails_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("a rank was started"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so that --device cuda passes its own check
    assert cli.main(["generate", "--tp", "2", "--device", "cuda"]) == 2
    assert f"--tp 2 needs 2 GPUs (one per rank) but this machine has {torch.cuda.device_count()}" in (
        capsys.readouterr().err)  # fmt: skip


# rank 1 dies while rank 0 waits for it in an all-reduce, which would wait for TIMEOUT_S without the launcher
DIES = """
import os, signal, torch, torch.distributed as dist
from llmkit import distributed
distributed.init(2)
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
while True:
    dist.all_reduce(torch.ones(1))
"""


def test_a_rank_that_dies_stops_the_others_and_is_named():
    start = time.monotonic()
    with pytest.raises(LLMKitError, match=r"rank 1 of 2 was killed by SIGKILL; the other ranks were stopped"):
        distributed.launch([sys.executable, "-c", DIES], 2)
    assert time.monotonic() - start < 60


# rank 0 of 2 started alone, as when torchrun's other rank never comes: it must give up after its timeout
ALONE = """
import sys
from llmkit import distributed
from llmkit.errors import LLMKitError
try:
    distributed.init(2, timeout_s=3)
except LLMKitError as e:
    sys.exit(str(e))
"""


def test_a_rank_whose_peers_never_come_says_so_within_its_timeout():
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(distributed._free_port())}  # fmt: skip
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", ALONE], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    assert "rank 0 of 2 could not join the others within 3 s" in done.stderr
    assert time.monotonic() - start < 60
