"""A ``torch.export`` program of one's own model: a hand-written GPT trained here, exported with
``torch.export.export`` (dynamic batch and sequence sizes), saved with ``torch.export.save`` and
exported by lmrt from the ``.pt2`` file or the ``ExportedProgram`` itself, each compared with the
original module run by plain PyTorch; and the programs lmrt refuses, each in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.export import Dim

from test_own_models import WORDS, Bigram, LstmLM, TinyGPT, one_torch_thread, torch_greedy, torch_perplexity, train  # noqa: F401 (one_torch_thread: autouse)
from lmrt.cli import main
from lmrt.export import ExportError, export_model
from lmrt.runtime import Generator

VOCAB = sorted(set(WORDS.split()))
DATA = [VOCAB.index(w) for w in WORDS.split()]
PROMPTS = ["the", "the cat", "a bird saw the", "the dog ran to the park"]
BLOCK = 32  # the GPT's position table; torch.export bounds the sequence below it (the mask's slice)
EXAMPLE = torch.zeros(2, 5, dtype=torch.long)
DYNAMIC = ({0: Dim("batch"), 1: Dim("seq", max=BLOCK - 1)},)


def program(module: nn.Module, dynamic_shapes=DYNAMIC, example=(EXAMPLE,)):
    return torch.export.export(module.eval(), example, dynamic_shapes=dynamic_shapes)


@pytest.fixture(scope="module")
def gpt_program(tmp_path_factory):
    """The trained GPT, its program saved as gpt.pt2, and its vocabulary as JSON, in one folder."""
    module = TinyGPT(len(VOCAB), block=BLOCK)
    train(module, DATA, steps=60)
    module.eval()
    folder = tmp_path_factory.mktemp("program")
    ep = program(module)
    torch.export.save(ep, folder / "gpt.pt2")
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    (folder / "eval.txt").write_text(WORDS)
    return folder, module, ep


def run_export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def test_lmrt_export_of_a_pt2_file_decodes_as_the_module(gpt_program):
    folder, module, _ = gpt_program
    out = folder / "out"
    result = run_export(folder / "gpt.pt2", "--tokenizer", folder / "vocab.json", "-o", out)
    assert result.exit_code == 0, result.output
    assert "whole-window graph of 31 tokens (the program's sequence dimension)" in result.stderr
    gen = Generator(str(out), provider="cpu")
    manifest = gen.manifest
    assert manifest.graph.decoding == "window" and manifest.architecture.context_length == BLOCK - 1
    assert manifest.provenance["source_kind"] == "torch.export program" and manifest.validation["greedy_tokens_identical"]
    prompts = [gen.encode(p) for p in PROMPTS]
    for ids in prompts:  # one prompt at a time, then all of them in one batch
        assert gen.generate_batch([ids], max_new_tokens=8, stop_token_ids=[])[0][0].token_ids == torch_greedy(module, ids, 8)
    batch = gen.generate_batch(prompts, max_new_tokens=8, stop_token_ids=[])
    assert [r[0].token_ids for r in batch] == [torch_greedy(module, ids, 8) for ids in prompts]
    ids = gen.encode(" ".join(WORDS.split()[: BLOCK - 1]))
    assert gen.score(ids).perplexity == pytest.approx(torch_perplexity(module, ids), rel=1e-3)


def test_an_exported_program_goes_to_int8_behind_the_gate(gpt_program, tmp_path):
    folder, module, ep = gpt_program
    manifest = export_model(ep, str(tmp_path / "int8"), tokenizer=VOCAB, precision="int8", eval_text=str(folder / "eval.txt"), progress=lambda line: None)
    assert manifest.quality["passed"] and manifest.quality["increase"] <= manifest.quality["max_increase"]
    assert manifest.quantization["quantized"]["linear"] >= 1
    gen = Generator(str(tmp_path / "int8"), provider="cpu")
    ids = gen.encode("the cat sat on the mat . the dog")
    assert gen.score(ids).perplexity == pytest.approx(torch_perplexity(module, ids), rel=0.05)


class LastLogits(TinyGPT):
    def forward(self, ids):
        return super().forward(ids)[:, -1]  # [batch, vocab]: not one row of logits per position


class TwoInputs(TinyGPT):
    def forward(self, ids, scale):
        return super().forward(ids) * scale


def save_as_pt2(folder, make) -> str:
    path = folder / "model.pt2"
    make(path)
    return path


REFUSED = {
    "static shapes": (
        lambda p: torch.export.save(program(TinyGPT(len(VOCAB)), dynamic_shapes=None), p),
        "the program was exported with a fixed batch at 2 and a fixed sequence length at 5; .* dynamic_shapes=",
    ),
    "not a zip": (lambda p: p.write_text("not a program"), "is not a torch.export archive .* torch.export.save"),
    "torch.save": (lambda p: torch.save(LstmLM(len(VOCAB)), p), "written by torch.save, not torch.export.save; lmrt never unpickles a module"),
    "not logits per position": (
        lambda p: torch.export.save(program(LastLogits(len(VOCAB))), p),
        r"logits of shape \[2, \d+\] for ids \[2, 3\]; lmrt needs forward\(ids \[batch, seq\]\) -> logits \[batch, seq, vocab\]",
    ),
    "recurrent": (
        lambda p: torch.export.save(program(LstmLM(len(VOCAB)), ({0: Dim.AUTO, 1: Dim.AUTO},)), p),
        "the program runs lstm \\(a recurrent layer\\).* pass the module itself",
    ),
    "two inputs": (
        lambda p: torch.export.save(program(TwoInputs(len(VOCAB)), ({0: Dim("b"), 1: Dim("s", max=31)}, None), (EXAMPLE, torch.tensor(2.0))), p),
        "the program takes 2 inputs",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_programs_are_one_line(case, gpt_program, tmp_path):
    make, message = REFUSED[case]
    path = save_as_pt2(tmp_path, make)
    out = tmp_path / "out"
    result = run_export(path, "--tokenizer", gpt_program[0] / "vocab.json", "-o", out)
    line = result.stderr.strip()
    assert result.exit_code != 0 and "\n" not in line and not out.exists(), result.output
    assert re.search(message, line), line


def test_program_options_that_do_not_apply_are_refused(gpt_program, tmp_path):
    folder, _, ep = gpt_program
    with pytest.raises(ExportError, match="takes no weights file"):
        export_model(str(folder / "gpt.pt2"), str(tmp_path / "out"), tokenizer=VOCAB, weights=str(folder / "vocab.json"))
    with pytest.raises(ExportError, match="max_length 40 is longer than the program's sequence dimension \\(31 tokens at most\\)"):
        export_model(ep, str(tmp_path / "out"), tokenizer=VOCAB, max_length=40)
    with pytest.raises(ExportError, match="state= is given, but the module's forward takes no state"):
        export_model(ep, str(tmp_path / "out"), tokenizer=VOCAB, state="infer")
    unbounded = program(Bigram(len(VOCAB)), ({0: Dim("batch"), 1: Dim("seq")},))
    with pytest.raises(ExportError, match="sequence dimension has no upper bound to take the window from; pass max_length="):
        export_model(unbounded, str(tmp_path / "out"), tokenizer=VOCAB)
    assert not (tmp_path / "out").exists()
    manifest = export_model(unbounded, str(tmp_path / "out"), tokenizer=VOCAB, max_length=12, progress=lambda line: None)
    assert manifest.architecture.context_length == 12
