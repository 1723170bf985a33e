"""The ``fat5`` command line: convert both ways, and bad input as one clear error line."""

import pytest
import torch
from transformers import T5ForConditionalGeneration

from fat5 import FAT5ForConditionalGeneration
from fat5.cli import main
from test_hf_parity import batch, make_hf


def test_convert_both_ways(tmp_path, capsys):
    hf = make_hf("t5-v1.1")
    hf.save_pretrained(tmp_path / "hf")
    main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "f")])
    main(["convert", "--to-hf", str(tmp_path / "f"), "--out", str(tmp_path / "back")])
    assert "converted" in capsys.readouterr().out
    ours = FAT5ForConditionalGeneration.from_pretrained(tmp_path / "f").eval()
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    ids, mask, labels, _ = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels).logits
        assert torch.allclose(ours(input_ids=ids, attention_mask=mask, labels=labels).logits, ref, atol=1e-5)
        assert torch.allclose(back(input_ids=ids, attention_mask=mask, labels=labels).logits, ref, atol=1e-6)


def test_convert_missing_folder_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "has no config.json" in capsys.readouterr().err
