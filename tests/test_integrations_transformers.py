"""``mcdrop.integrations.transformers``: MC dropout evaluation of a real Hugging Face ``Trainer`` on the CPU.

Tiny BERT models built from configs (random weights, nothing downloaded) and synthetic data sets
(lists of dicts). Every metric is checked against a computation by hand from
``mcdrop.MCDropout(...).predict`` / ``predict_loader`` and :mod:`mcdrop.metrics` with the same seed
and pass sizes, so the integration adds no number of its own.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import mcdrop
from mcdrop import metrics as mcm
from mcdrop.errors import InvalidInputError, MissingDependencyError

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LENGTH, CLASSES = 40, 6, 3


@pytest.fixture(scope="module")
def hf(T):
    """``mcdrop.integrations.transformers``, imported once ``transformers`` is known to import."""
    return importlib.import_module("mcdrop.integrations.transformers")


def bert(T, head: str = "sequence", *, dropout: float = 0.1, attention_dropout: float = 0.1, **config):
    torch.manual_seed(0)
    cfg = T.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=config.pop("num_labels", CLASSES),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=attention_dropout,
        **config,
    )
    cls = T.BertForSequenceClassification if head == "sequence" else T.BertForTokenClassification
    return cls(cfg)


def sequence_data(n: int = 10, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        mask = torch.ones(LENGTH, dtype=torch.long)
        mask[LENGTH - i % 3 :] = 0  # some padded rows
        rows.append(
            {
                "input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g),
                "attention_mask": mask,
                "labels": torch.tensor(i % CLASSES),
            }
        )
    return rows


def token_data(n: int = 9, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        labels = torch.randint(0, CLASSES, (LENGTH,), generator=g)
        labels[0] = -100  # the [CLS] position
        labels[LENGTH - 1 - i % 3 :] = -100  # padding, as DataCollatorForTokenClassification pads
        rows.append({"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g), "labels": labels})
    return rows


def trainer_for(T, model, tmp_path, eval_data, *, eval_batch_size: int = 4, train_data=None, **args):
    arguments = T.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_eval_batch_size=eval_batch_size,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        **args,
    )
    trainer = T.Trainer(model=model, args=arguments, train_dataset=train_data, eval_dataset=eval_data)
    trainer.remove_callback(T.PrinterCallback)  # no printed logs in the test output
    return trainer


def snapshot(model):
    return (
        {name: m.training for name, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_same_state(model, before):
    flags, state = before
    assert {name: m.training for name, m in model.named_modules()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def classification_metrics(probs, labels, entropy, mi, n_bins=15):
    wrong = probs.argmax(-1) != labels
    return {
        "accuracy": mcm.accuracy(probs, labels),
        "nll": mcm.negative_log_likelihood(probs, labels),
        "brier": mcm.brier_score(probs, labels),
        "ece": mcm.expected_calibration_error(probs, labels, n_bins=n_bins),
        "aurc": mcm.aurc(entropy, wrong),
        "misclassification_auroc": mcm.misclassification_auroc(entropy, wrong),
        "predictive_entropy": float(entropy.double().mean()),
        "mutual_information": float(mi.double().mean()),
        "n_predictions": float(len(labels)),
    }


def test_sequence_classification_metrics_match_predict_loader_and_the_eval_batch_size_holds(T, hf, tmp_path):
    model = bert(T)  # a fresh HF model is in train mode, as it is after trainer.train()
    data = sequence_data(10)
    trainer = trainer_for(T, model, tmp_path, data, eval_batch_size=4)
    before = snapshot(model)
    rng = torch.get_rng_state()
    rows_per_pass: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_per_pass.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        got = hf.mc_evaluate(trainer, n_samples=6, seed=3)
    finally:
        hook.remove()
    # the trainer's per_device_eval_batch_size bounds every forward pass (replicas counted)
    assert rows_per_pass and max(rows_per_pass) <= 4
    assert sum(rows_per_pass) >= 6 * len(data)  # every sample of every row was drawn
    assert_same_state(model, before)  # modes (train) and parameters as they were
    assert torch.equal(torch.get_rng_state(), rng)  # seeded: the global generator untouched

    # by hand: the same batches, the same seed and pass sizes, in eval mode as the Trainer evaluates
    model.eval()
    loader = DataLoader(data, batch_size=4, collate_fn=T.default_data_collator)
    pred = mcdrop.MCDropout(model, 6, seed=3, max_batch_size=4).predict_loader(loader, progress=False)
    model.train()
    expected = classification_metrics(
        pred.probs, pred.targets, pred.predictive_entropy, pred.mutual_information
    )
    assert set(got) == {f"eval_mc_{name}" for name in expected}
    for name, value in expected.items():
        assert got[f"eval_mc_{name}"] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert got["eval_mc_mutual_information"] > 0  # dropout was sampled

    # the same seed gives the same metrics again; another prefix only renames them
    again = hf.mc_evaluate(trainer, n_samples=6, seed=3, metric_key_prefix="test")
    assert again == {key.replace("eval_", "test_", 1): value for key, value in got.items()}


def test_without_the_default_pass_size_mcdrop_chooses_larger_passes(T, hf, tmp_path):
    """The bound above comes from the trainer's eval batch size, not from mcdrop's own choice."""
    model = bert(T).eval()
    trainer = trainer_for(T, model, tmp_path, sequence_data(8), eval_batch_size=4)
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        hf.mc_evaluate(trainer, n_samples=6, max_batch_size=None, strategy="replicate")
    finally:
        hook.remove()
    assert max(rows) > 4


def test_token_classification_ignores_minus_100_labels(T, hf, tmp_path):
    model = bert(T, "token").eval()
    data = token_data(9)
    trainer = trainer_for(T, model, tmp_path, data, eval_batch_size=4)
    got = hf.mc_evaluate(trainer, n_samples=5, seed=0)

    mc = mcdrop.MCDropout(model, 5, seed=0, max_batch_size=4)
    probs, labels, entropy, mi = [], [], [], []
    for batch in DataLoader(data, batch_size=4, collate_fn=T.default_data_collator):
        pred = mc.predict(input_ids=batch["input_ids"])
        assert pred.probs.shape == (len(batch["labels"]), LENGTH, CLASSES)
        valid = batch["labels"] != -100
        probs.append(pred.probs[valid])
        labels.append(batch["labels"][valid])
        entropy.append(pred.predictive_entropy[valid])
        mi.append(pred.mutual_information[valid])
    expected = classification_metrics(torch.cat(probs), torch.cat(labels), torch.cat(entropy), torch.cat(mi))
    n_valid = sum(int((row["labels"] != -100).sum()) for row in data)
    assert expected["n_predictions"] == n_valid < len(data) * LENGTH
    for name, value in expected.items():
        assert got[f"eval_mc_{name}"] == pytest.approx(value, rel=1e-6, abs=1e-9), name

    # changing the labels at ignored positions to real classes would change the metrics: they count
    counted = [{**row, "labels": torch.where(row["labels"] == -100, 0, row["labels"])} for row in data]
    everything = hf.mc_evaluate(trainer, counted, n_samples=5, seed=0)
    assert everything["eval_mc_n_predictions"] == len(data) * LENGTH
    assert everything["eval_mc_accuracy"] != got["eval_mc_accuracy"]


def test_regression_gets_regression_metrics(T, hf, tmp_path):
    model = bert(T, num_labels=1, problem_type="regression").eval()
    g = torch.Generator().manual_seed(4)
    data = [
        {"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g), "labels": torch.randn((), generator=g)}
        for _ in range(8)
    ]
    got = hf.mc_evaluate(trainer_for(T, model, tmp_path, data), n_samples=5, seed=0, level=0.9)
    loader = DataLoader(data, batch_size=4, collate_fn=T.default_data_collator)
    pred = mcdrop.MCDropout(model, 5, seed=0, max_batch_size=4).predict_loader(loader, progress=False)
    mean, std, y = pred.mean.reshape(-1), pred.total_std.reshape(-1), pred.targets
    expected = {
        "rmse": mcm.rmse(mean, y),
        "mae": mcm.mae(mean, y),
        "nll": mcm.gaussian_nll(mean, std, y),
        "crps": mcm.crps_gaussian(mean, std, y),
        "picp": mcm.picp(mean, std, y, level=0.9),
        "mpiw": mcm.mpiw(std, level=0.9),
        "std": float(std.double().mean()),
        "n_predictions": 8.0,
    }
    assert set(got) == {f"eval_mc_{name}" for name in expected}
    for name, value in expected.items():
        assert got[f"eval_mc_{name}"] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_attention_dropout_alone_is_sampled_and_described(T, hf, tmp_path):
    model = bert(T, dropout=0.0, attention_dropout=0.3, initializer_range=0.5).eval()  # outputs that vary
    mc = mcdrop.MCDropout(model, n_samples=4, seed=0)
    samples = mc.sample(input_ids=torch.randint(0, VOCAB, (3, LENGTH)))
    assert not torch.equal(samples[0], samples[1])  # attention dropout is the only randomness
    sites = mc.describe()
    sampled = sites[sites["sampled"]]
    assert set(sampled["kind"]) == {"attention_dropout"}
    assert sampled["rate"].tolist() == pytest.approx([0.3] * len(sampled))
    assert any(path.endswith("attention.self") for path in sampled["path"])
    got = hf.mc_evaluate(trainer_for(T, model, tmp_path, sequence_data(6)), n_samples=4)
    assert got["eval_mc_mutual_information"] > 0


def test_callback_adds_metrics_to_training_evaluations_and_log_history(T, hf, tmp_path):
    train, evaluation = sequence_data(8, seed=5), sequence_data(6, seed=6)

    def run(callbacks, **args):
        model = bert(T)
        trainer = trainer_for(
            T,
            model,
            tmp_path,
            evaluation,
            train_data=train,
            eval_strategy="epoch",
            num_train_epochs=2,
            logging_steps=1,
            **args,
        )
        for callback in callbacks:
            trainer.add_callback(callback)
        trainer.train()
        return trainer

    plain = run([])
    # the best model is chosen by an MC metric: it is in the metrics the trainer compares
    trainer = run(
        [hf.MCEvaluationCallback(n_samples=4, seed=1)],
        metric_for_best_model="eval_mc_ece",
        greater_is_better=False,
    )
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == 2  # one per epoch, each with the MC metrics in the same entry
    for entry in evaluations:
        assert {"eval_mc_accuracy", "eval_mc_ece", "eval_mc_nll", "eval_mc_mutual_information"} <= set(entry)
        assert entry["eval_mc_n_predictions"] == len(evaluation)
    assert trainer.state.best_metric == min(entry["eval_mc_ece"] for entry in evaluations)
    # seeded: training drew the same random numbers as without the callback
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (plain, trainer)]
    assert losses[0] == losses[1]

    # trainer.evaluate(): in the returned dict and in the last log entry, equal to mc_evaluate's
    metrics = trainer.evaluate()
    direct = hf.mc_evaluate(trainer, n_samples=4, seed=1)
    for key, value in direct.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), key
        assert trainer.state.log_history[-1][key] == metrics[key]
    # the last epoch's evaluation saw the same final model
    assert evaluations[-1]["eval_mc_accuracy"] == pytest.approx(direct["eval_mc_accuracy"])


def test_callback_with_several_evaluation_sets_uses_each_prefix(T, hf, tmp_path):
    model = bert(T).eval()
    sets = {"a": sequence_data(4, seed=7), "b": sequence_data(5, seed=8)}
    trainer = trainer_for(T, model, tmp_path, sets)
    trainer.add_callback(hf.MCEvaluationCallback(n_samples=3))
    metrics = trainer.evaluate()
    assert metrics["eval_a_mc_n_predictions"] == 4 and metrics["eval_b_mc_n_predictions"] == 5
    assert metrics["eval_b_mc_accuracy"] == pytest.approx(
        hf.mc_evaluate(trainer, "b", n_samples=3, metric_key_prefix="eval_b")["eval_b_mc_accuracy"]
    )
    with pytest.raises(InvalidInputError, match="eval_dataset=<name>"):
        hf.mc_evaluate(trainer, n_samples=3)


def test_report_is_returned_and_agrees_with_the_metrics(T, hf, tmp_path):
    model = bert(T).eval()
    trainer = trainer_for(T, model, tmp_path, sequence_data(10))
    metrics, report = hf.mc_evaluate(trainer, n_samples=4, report=True)
    assert isinstance(report, mcdrop.UncertaintyReport)
    assert len(report.per_input) == metrics["eval_mc_n_predictions"] == 10
    assert report.metrics["accuracy"] == pytest.approx(metrics["eval_mc_accuracy"])
    assert report.metrics["ECE"] == pytest.approx(metrics["eval_mc_ece"])


def test_report_has_the_dropout_off_baseline_and_its_metrics(T, hf, tmp_path):
    model = bert(T)
    data = sequence_data(10)
    trainer = trainer_for(T, model, tmp_path, data, eval_batch_size=4)
    before = snapshot(model)
    metrics, report = hf.mc_evaluate(trainer, n_samples=4, seed=2, report=True)
    assert_same_state(model, before)
    # by hand: the same batches and seed, dropout off for the baseline, in eval mode as the Trainer
    model.eval()
    loader = DataLoader(data, batch_size=4, collate_fn=T.default_data_collator)
    pred = mcdrop.MCDropout(model, 4, seed=2, max_batch_size=4).predict_loader(
        loader, progress=False, deterministic=True
    )
    model.train()
    base = pred.deterministic
    expected = classification_metrics(
        base.probs, pred.targets, base.predictive_entropy, base.mutual_information
    )
    del expected["mutual_information"]  # one pass: none
    assert {k for k in metrics if "_deterministic_" in k} == {f"eval_deterministic_{n}" for n in expected}
    for name, value in expected.items():
        assert metrics[f"eval_deterministic_{name}"] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    summary = report.summary.set_index("metric")
    assert summary.loc["ECE", "deterministic"] == pytest.approx(metrics["eval_deterministic_ece"], rel=1e-9)
    # the extra pass leaves the MC numbers as they are; baseline=False makes neither it nor the column
    plain, plain_report = hf.mc_evaluate(trainer, n_samples=4, seed=2, report=True, baseline=False)
    assert plain == {k: v for k, v in metrics.items() if "_mc_" in k}
    assert "deterministic" not in plain_report.summary.columns
    # without a report: no extra pass, MC metrics only
    assert hf.mc_evaluate(trainer, n_samples=4, seed=2) == plain


def test_regression_baseline_has_the_metrics_of_the_mean(T, hf, tmp_path):
    model = bert(T, num_labels=1, problem_type="regression").eval()
    data = [{**row, "labels": torch.tensor(float(i) / 10)} for i, row in enumerate(sequence_data(8))]
    trainer = trainer_for(T, model, tmp_path, data)
    metrics, report = hf.mc_evaluate(trainer, n_samples=3, report=True)
    base = {k.removeprefix("eval_deterministic_"): v for k, v in metrics.items() if "_deterministic_" in k}
    assert set(base) == {"rmse", "mae", "n_predictions"}
    assert base["rmse"] == pytest.approx(
        float(report.summary.set_index("metric").loc["RMSE", "deterministic"])
    )


@pytest.mark.slow
def test_report_folder_is_saved(T, hf, tmp_path):
    model = bert(T, "token").eval()
    trainer = trainer_for(T, model, tmp_path, token_data(6))
    metrics, report = hf.mc_evaluate(trainer, n_samples=3, report=tmp_path / "report")
    assert (tmp_path / "report" / "report.html").exists()
    assert len(report.per_input) == metrics["eval_mc_n_predictions"]


def test_refusals_are_clear_and_leave_the_model_as_it_was(T, hf, tmp_path):
    multi = bert(T, problem_type="multi_label_classification")
    with pytest.raises(InvalidInputError, match="multi-label"):
        hf.mc_evaluate(trainer_for(T, multi, tmp_path, sequence_data(4)), n_samples=2)

    model = bert(T)  # train mode
    before = snapshot(model)
    data = sequence_data(8)
    data[5] = {k: v for k, v in data[5].items() if k != "labels"}  # the second batch lacks labels
    collate = lambda rows: {  # noqa: E731 - keep each batch's own keys
        key: torch.stack([r[key] for r in rows]) for key in rows[0] if all(key in r for r in rows)
    }
    trainer = trainer_for(T, model, tmp_path, data)
    trainer.data_collator = collate
    with pytest.raises(InvalidInputError, match="no labels under 'labels'"):
        hf.mc_evaluate(trainer, n_samples=2)
    assert_same_state(model, before)  # the exception left the modes as they were

    ignored = [{**row, "labels": torch.tensor(-100)} for row in sequence_data(4)]
    with pytest.raises(InvalidInputError, match="-100"):
        hf.mc_evaluate(trainer_for(T, bert(T), tmp_path, ignored), n_samples=2)
    with pytest.raises(InvalidInputError, match="folder"):
        hf.MCEvaluationCallback(report=True)

    class TwoProcesses(type(trainer.args)):
        world_size = 2  # what TrainingArguments says under torchrun with two processes

    trainer.args.__class__ = TwoProcesses
    with pytest.raises(InvalidInputError, match="2 processes"):
        hf.mc_evaluate(trainer, n_samples=2)


def test_callback_refuses_several_processes_before_training_not_at_the_first_evaluation(T, hf, tmp_path):
    class TwoProcesses(T.TrainingArguments):
        world_size = 2  # what TrainingArguments says under torchrun with two processes

    model = bert(T)
    before = snapshot(model)
    trainer = trainer_for(
        T, model, tmp_path, sequence_data(4), train_data=sequence_data(8), eval_strategy="epoch"
    )
    trainer.add_callback(hf.MCEvaluationCallback(n_samples=2))  # added after init: on_init_end missed
    trainer.args.__class__ = TwoProcesses
    evaluated = []
    trainer.evaluate = lambda *a, **k: evaluated.append(1)  # noqa: ARG005 - would be the first evaluation
    with pytest.raises(InvalidInputError, match="2 processes"):
        trainer.train()
    assert trainer.state.global_step == 0 and not evaluated  # refused before any step or evaluation
    assert_same_state(model, before)

    # given to the Trainer itself: refused while it is built
    arguments = TwoProcesses(output_dir=str(tmp_path / "out2"), report_to=[], use_cpu=True)
    with pytest.raises(InvalidInputError, match="2 processes"):
        T.Trainer(model=bert(T), args=arguments, callbacks=[hf.MCEvaluationCallback(n_samples=2)])


def test_all_right_predictions_give_nan_misclassification_auroc(T, hf, tmp_path):
    model = bert(T).eval()
    data = sequence_data(6)
    loader = DataLoader(data, batch_size=4, collate_fn=T.default_data_collator)
    pred = mcdrop.MCDropout(model, 3, seed=0, max_batch_size=4).predict_loader(loader, progress=False)
    # labels made equal to what the same seeded MC evaluation predicts: every prediction right
    right = [{**row, "labels": label} for row, label in zip(data, pred.predicted, strict=True)]
    got = hf.mc_evaluate(trainer_for(T, model, tmp_path, right), n_samples=3, seed=0)
    assert got["eval_mc_accuracy"] == 1.0
    assert math.isnan(got["eval_mc_misclassification_auroc"])  # undefined: no wrong prediction
    assert got["eval_mc_aurc"] == 0.0


def test_missing_transformers_names_the_extra(monkeypatch, T):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    monkeypatch.delitem(sys.modules, "mcdrop.integrations.transformers", raising=False)
    with pytest.raises(MissingDependencyError, match=r'pip install "mcdrop\[transformers\]"'):
        importlib.import_module("mcdrop.integrations.transformers")


def test_import_mcdrop_does_not_import_transformers():
    code = "import sys, mcdrop, mcdrop.integrations; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def hugging_face_example() -> str:
    """The first Python block of the Hugging Face section of docs/integrations.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    section = text.split("## Hugging Face Trainer", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow  # trains the example's model for two epochs and builds a report
def test_the_documented_example_runs(T, hf, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: str(tmp_path))
    namespace: dict[str, object] = {}
    exec(compile(hugging_face_example(), "docs/integrations.md", "exec"), namespace)  # noqa: S102
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    per_epoch = eval(printed[0])  # noqa: S307 - the list the example prints (not the trainer's logs)
    assert len(per_epoch) == 2 and all(0 <= ece <= 1 for ece in per_epoch)
    assert isinstance(namespace["report"], mcdrop.UncertaintyReport)
    assert namespace["metrics"]["eval_mc_n_predictions"] == 24


def test_adaptive_sampling_on_token_classification(T, hf, tmp_path):
    model = bert(T, "token").eval()
    data = token_data(5)
    trainer = trainer_for(T, model, tmp_path, data)
    got = hf.mc_evaluate(trainer, n_samples="auto", tolerance=0.05, max_samples=16)
    assert got["eval_mc_n_predictions"] == sum(int((row["labels"] != -100).sum()) for row in data)
    assert 0 <= got["eval_mc_accuracy"] <= 1 and got["eval_mc_mutual_information"] >= 0
