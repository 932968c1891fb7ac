"""Missing labels (None, NaN, pandas' NA and NaT) are refused by ``Recorder.annotate`` with one
clear RoutingError — how many, where the first is, what to do — instead of each NaN becoming a
class of its own (NaN != NaN) and mixing made-up classes into the metrics by label. A refused
call records nothing, so the same call can be labelled again. The CLI's CSV path drops rows
without a label (and says so in one line when none is left), so no missing label reaches it."""

from __future__ import annotations

import decimal

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import lily_lab as ll
from lily_lab.app import cli
from lily_lab.app import demo as D
from lily_lab.observe import RoutingError

from _tiny_bert import save_lily_adapter, save_model_folder

transformers = pytest.importorskip("transformers")

NAN = float("nan")


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, x, attention_mask=None):
        return self.proj(x)


def holder():
    torch.manual_seed(0)
    return ll.add_lily(Holder(), ll.LilyConfig(["proj"], r=3, num_B=3, routing="token", init_weights=False))


# case → (labels as a user passes them, how many are missing, the first's position)
MISSING = {
    "float NaN": ([NAN, "pos", NAN, "neg"], 2, 0),
    "None": (["neg", "pos", None, "neg"], 1, 2),
    "pd.NA": (["neg", pd.NA, "pos", "neg"], 1, 1),
    "np.nan in an object array": (np.array(["neg", np.nan, "pos", np.nan], dtype=object), 2, 1),
    "a float column with missing values": (pd.Series([1.0, np.nan, 0.0, np.nan]), 2, 1),
    "a string column with missing values": (pd.Series(["a", None, "b", np.nan]).astype("string"), 2, 1),
    "an object column with None and NaN": (pd.Series(["a", None, "b", np.nan], dtype=object), 2, 1),
    "a float32 array": (np.array([0, 1, np.nan, 1], dtype=np.float32), 1, 2),
    "a float tensor": (torch.tensor([0.0, 1.0, 1.0, NAN]), 1, 3),
    "pd.NaT": ([pd.Timestamp("2020-01-01"), pd.NaT, pd.Timestamp("2020-01-02"), pd.NaT], 2, 1),
    "Decimal NaN": ([decimal.Decimal("1"), decimal.Decimal("NaN"), decimal.Decimal("2"), decimal.Decimal("1")], 1, 1),
    "all of them": ([None, np.nan, pd.NA, NAN], 4, 0),
}


def _one_call(model, rec, n=4):
    model(torch.randn(n, 5, 3))


@pytest.mark.parametrize("case", list(MISSING))
def test_missing_labels_are_refused_and_nothing_is_recorded(case):
    labels, count, first = MISSING[case]
    model = holder()
    with ll.record_routing(model) as rec:
        _one_call(model, rec)
        with pytest.raises(RoutingError) as info:
            rec.annotate(labels=labels)
        message = str(info.value)
        assert f"got {count} missing label{'s' if count > 1 else ''} " in message, message
        assert "among 4" in message and f"the first at position {first} " in message, message
        assert "drop those sequences" in message and "fillna" in message and "\n" not in message, message
        assert rec.routing.labels == []  # refused before anything was coded
        rec.annotate(labels=["neg", "pos", "neg", "neg"])  # the same call, labelled again
    routing = rec.routing
    assert routing.labels == ["neg", "pos"]
    assert sorted(ll.specialization(routing).value.unique()) == ["neg", "pos"]


NORMAL = {
    "strings": (["neg", "pos", "neg", "pos"], ["neg", "pos"]),
    "float labels, none missing": (pd.Series([1.0, 0.0, 1.0, 2.0]), [1.0, 0.0, 2.0]),
    "int tensor": (torch.tensor([1, 0, 1, 1]), [1, 0]),
    "zero and the empty string are labels": ([0, "", 0, ""], [0, ""]),
    "a string column without missing values": (pd.Series(["a", "b", "a", "b"]).astype("string"), ["a", "b"]),
}


@pytest.mark.parametrize("case", list(NORMAL))
def test_labels_without_missing_values_are_coded_as_before(case):
    labels, classes = NORMAL[case]
    model = holder()
    with ll.record_routing(model) as rec:
        _one_call(model, rec)
        rec.annotate(labels=labels)
    assert rec.routing.labels == classes
    assert len(ll.specialization(rec.routing).value.unique()) == len(classes)


def test_one_nan_per_call_would_have_made_a_class_per_call():
    """The bug this guards against: three calls, each with a NaN label, gave three 'nan' classes."""
    model = holder()
    with ll.record_routing(model) as rec:
        for _ in range(3):
            _one_call(model, rec, n=2)
            with pytest.raises(RoutingError, match="position 1"):
                rec.annotate(labels=pd.Series([0.0, np.nan]))
            rec.annotate(labels=pd.Series([0.0, np.nan]).fillna(-1.0))
    assert rec.routing.labels == [0.0, -1.0]


def test_record_dataset_passes_the_refusal_on():
    model = holder()
    data = [(torch.randn(2, 4, 3), torch.tensor([0.0, 1.0])), (torch.randn(2, 4, 3), torch.tensor([NAN, 1.0]))]
    with pytest.raises(RoutingError, match="1 missing label .*position 0"):
        ll.record_dataset(model, data)


# --------------------------------------------------------------------------- the CLI's CSV path
def test_load_csv_drops_rows_without_a_label_and_codes_the_rest(tmp_path):
    path = tmp_path / "texts.csv"
    path.write_text("text,label\nthe movie,pos\na film,\nthe day,NA\nthe night,neg\nso good,nan\nnot bad,pos\n")
    frame = D.load_csv(path)
    assert frame.attrs["label_names"] == ["neg", "pos"]
    assert frame["label"].tolist() == [1, 0, 1] and frame["text"].tolist() == ["the movie", "the night", "not bad"]


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A one-layer tiny BERT folder and a Lily adapter for it (tests/_tiny_bert.py)."""
    return (save_model_folder(tmp_path_factory.mktemp("tiny_bert"), num_hidden_layers=1),
            save_lily_adapter(tmp_path_factory.mktemp("adapter") / "lily", num_hidden_layers=1))


@pytest.mark.parametrize("rows, ok", [(["the movie,pos", "a film,", "not bad,neg", "so good,NA"], True),
                                      (["the movie,", "a film,NA", "not bad,nan"], False)])
def test_report_with_missing_labels_runs_or_says_why_in_one_line(rows, ok, base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    data = tmp_path / "texts.csv"
    data.write_text("\n".join(["text,label", *rows]) + "\n")
    out = tmp_path / "r.html"
    capsys.readouterr()
    rc = cli.main(["report", str(adapter), "--model", str(base), "--data", str(data), "--texts", "8",
                   "--label-column", "label", "--out", str(out)])
    err = capsys.readouterr().err
    if ok:
        assert rc == 0 and out.is_file(), err[-2000:]
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and str(data) in lines[0] and "no usable rows" in lines[0], err[-2000:]
        assert not out.exists()
