"""What each artifact holds, declared once: one Schema per artifact file (validation.py gives
the kinds of value and the check).

Every reader passes what it read through its Schema's `check` (JSON files through
`read_json`) before using any field, so a file edited by hand, cut short or written by another
version ends as one line naming the file, the field and the stage to rerun. docs/schemas.md is
rendered from these declarations (schema_docs.py), so the documentation cannot drift from what
is checked.

Records accept fields they do not declare (newer versions may add some), except the
training settings (SETTINGS_RECORD), which must all be known to rebuild a TrainConfig.
"""

from __future__ import annotations

from mnistsum_cli.settings import (
    ARCHITECTURE_NAMES,
    MAX_EPOCHS,
    MAX_LR,
    MAX_SEED,
    MAX_WEIGHT_DECAY,
    Setting,
    setting_fields,
)
from mnistsum_cli.store.diskfiles import (
    MAX_CHECKPOINT_BYTES,
    MAX_HISTORY_BYTES,
    MAX_MODEL_BYTES,
    MAX_SPLIT_BYTES,
)
from mnistsum_cli.store.paths import MAX_RUN_ID, MNIST_IMAGES, NUM_DIGITS, NUM_SUMS, RUN_ID_PATTERN, SPLITS
from mnistsum_cli.store.validation import (
    Bool,
    Field,
    Float,
    Int,
    Kind,
    ListOf,
    MapOf,
    Nullable,
    Record,
    Schema,
    Str,
)


def _setting_kind(kind: type, setting: Setting) -> Kind:
    """The Kind of one training setting, from its declaration in settings.py: the bounds the
    command line enforces are the bounds an artifact's settings are held to."""
    if setting.choices:
        return Str(setting.choices)
    if kind is bool:
        return Bool()
    if kind is int:
        return Int(setting.min, setting.max)
    return Float(setting.min, setting.max, setting.above)


def _settings() -> Record:
    """TrainConfig's fields, typed and bounded from their `setting(...)`: one declaration of the settings."""
    return Record(
        {name: Field(_setting_kind(kind, setting), "", required=False) for name, kind, setting in setting_fields()},
        title="training settings",
        closed=True,
    )


HEX = Str(pattern="[0-9a-f]{1,64}", pattern_text="hex string of 1-64 digits")  # a content hash
RUN = Str(
    pattern=RUN_ID_PATTERN, pattern_text=f"1-{MAX_RUN_ID} ASCII letters and digits"
)  # paths.RUN_ID_PATTERN says why
EPOCH = Int(1, MAX_EPOCHS)
LOSS = Float(0.0)  # cross-entropy
SHARE = Float(0.0, 1.0)  # an accuracy, a probability
COUNT = Int(0, MNIST_IMAGES)  # rows of a split: no split holds more images than MNIST has

SETTINGS_RECORD = _settings()
RUN_ID = Field(RUN, "the training run (random hex), shared by all of its files")
DATASET_ID = Field(HEX, "the dataset trained on (hash of the rows and of MNIST)")
CONFIG = Field(SETTINGS_RECORD, "the training settings (TrainConfig); missing ones take their defaults")
PROCESSES = {
    "world_size": Field(Int(1), "training processes (torchrun)", required=False),
    "backend": Field(Nullable(Str()), "torch.distributed backend, null for one process", required=False),
}


def matrix(size: int) -> ListOf:
    """A square matrix of counts of rows, as a list of rows."""
    return ListOf(ListOf(COUNT, length=size), length=size)


METRIC_NAMES = ("digit_loss", "sum_loss", "loss", "digit_accuracy", "sum_accuracy")


def metric_kind(name: str) -> Kind:
    """A loss is >= 0, an accuracy a share of rows."""
    return SHARE if name.endswith("accuracy") else LOSS


SPLIT_META = Schema(
    "train.parquet, val.parquet, test.parquet: schema metadata under key `mnistsum`",
    "prepare",
    Record(
        {
            "split": Field(Str(SPLITS), "which split the file holds"),
            "dataset_id": Field(HEX, "hash of the three splits' rows and of the MNIST files; equal in all three"),
            "seed": Field(Int(0, MAX_SEED), "`prepare --seed`"),
            "val_size": Field(Int(1, MNIST_IMAGES), "`prepare --val-size`"),
            "limit": Field(Nullable(Int(1)), "`prepare --limit`"),
            "mnist_root": Field(Str(), "the MNIST folder read"),
            "mnist_files": Field(
                MapOf(ListOf(Int(0), length=2)),
                "[size, modification time in ns] of each raw MNIST file read: unchanged stamps tell an "
                "up-to-date check that MNIST need not be read",
                required=False,
            ),
            "mnist_fingerprint": Field(HEX, "hash of the MNIST images and labels read"),
            "mnist_sizes": Field(
                Record(
                    {name: Field(Int(1, MNIST_IMAGES), f"images in the MNIST {name} set") for name in ("train", "test")}
                ),
                "images per MNIST set; image_index is below it (checked against MNIST when it is loaded)",
            ),
            "package_version": Field(Str(), "mnistsum version that wrote it", required=False),
            "created_at": Field(Str(), "UTC time, ISO 8601", required=False),
        }
    ),
    "The rows are the columns image_index (uint16), digit, number, sum (uint8), none null.",
    max_bytes=MAX_SPLIT_BYTES,
)

STEP_RECORD = Record(
    {
        "step": Field(Int(1), "optimizer steps since the run began, at the window's end"),
        "epoch": Field(Float(0.0, MAX_EPOCHS), "the same in epochs (fractional: 1.0 is the end of the first)"),
        "lr": Field(Float(0.0, MAX_LR), "mean learning rate over the window"),
        **{
            f"train_{name}": Field(metric_kind(name), f"train {name.replace('_', ' ')}, mean over the window")
            for name in METRIC_NAMES
        },
    },
    title="step record",
)

EPOCH_RECORD = Record(
    {
        "epoch": Field(EPOCH, "1, 2, ..."),
        **{
            f"{split}_{name}": Field(metric_kind(name), f"{split} {name.replace('_', ' ')}")
            for split in ("train", "val")
            for name in METRIC_NAMES
        },
        "lr_end": Field(Float(0.0, MAX_LR), "learning rate at the epoch's last step", required=False),
        "seconds": Field(Float(0.0), "wall time of the epoch", required=False),
        "world_size": Field(Int(1), "training processes", required=False),
        "steps": Field(
            ListOf(STEP_RECORD), "train metrics through the epoch, one record per window of steps", required=False
        ),
    },
    title="epoch record",
)

HISTORY = Schema(
    "history.json",
    "train",
    Record(
        {
            "run_id": RUN_ID,
            "dataset_id": DATASET_ID,
            "config": CONFIG,
            "best_epoch": Field(EPOCH, "the epoch model.safetensors holds"),
            "epochs": Field(
                ListOf(EPOCH_RECORD, min_length=1, max_length=MAX_EPOCHS), "one epoch record per epoch done"
            ),
            **PROCESSES,
        }
    ),
    "Rewritten after every epoch.",
    rules=(("best_epoch <= the number of epochs", lambda history: history["best_epoch"] <= len(history["epochs"])),),
    max_bytes=MAX_HISTORY_BYTES,
)

TRAIN_STATE = Schema(
    "train_state.json",
    "train",
    Record(
        {
            "run_id": RUN_ID,
            "dataset_id": DATASET_ID,
            "config": CONFIG,
            "epoch": Field(EPOCH, "epochs saved (the checkpoint's)"),
            "best_epoch": Field(EPOCH, "the epoch model.safetensors holds"),
            "updated_at": Field(Str(), "UTC time, ISO 8601", required=False),
            **PROCESSES,
        }
    ),
    "What `train --resume`, `status` and `run` read first.",
    rules=(("best_epoch <= epoch", lambda state: state["best_epoch"] <= state["epoch"]),),
)

RUN_SETUP = Schema(
    "config.json",
    "train",
    Record(
        {
            "run_id": RUN_ID,
            "dataset_id": DATASET_ID,
            "config": CONFIG,
            "device": Field(Str(), "torch device trained on", required=False),
            "precision": Field(Str(), "fp32, bf16 or fp16", required=False),
            "torch_version": Field(Str(), "", required=False),
            "package_version": Field(Str(), "", required=False),
            "started_at": Field(Str(), "UTC time, ISO 8601", required=False),
            **PROCESSES,
        }
    ),
    "The run's settings and environment, for people and for setting a run aside.",
)

MODEL_META = Schema(
    "model.safetensors: header metadata (each value JSON-encoded)",
    "train",
    Record(
        {
            "format": Field(Str(), "mnistsum-model/1"),
            "arch": Field(Str(ARCHITECTURE_NAMES), "the architecture the weights fit"),
            "run_id": RUN_ID,
            "dataset_id": DATASET_ID,
            "config": CONFIG,
            "epoch": Field(EPOCH, "the epoch of these weights (the best on val)"),
            "val_digit_accuracy": Field(SHARE, "at that epoch"),
            "val_sum_accuracy": Field(SHARE, "at that epoch"),
            "package_version": Field(Str(), "", required=False),
            **PROCESSES,
        }
    ),
    "Tensors: the model's state_dict.",
    max_bytes=MAX_MODEL_BYTES,
)

# What `train --resume` restores of AdamW's hyperparameters (other keys are torch's flags).
PARAM_GROUP = Record(
    {
        "params": Field(ListOf(Int(0)), "the indices of the group's parameters"),
        "lr": Field(Float(0.0, MAX_LR), "the learning rate of the last step"),
        "weight_decay": Field(Float(0.0, MAX_WEIGHT_DECAY), "`--weight-decay`, or 0"),
        "betas": Field(ListOf(Float(0.0, 1.0), length=2), "AdamW's moment decays"),
        "eps": Field(Float(above=0.0), "AdamW's epsilon"),
    },
    title="param group",
)

CHECKPOINT_META = Schema(
    "checkpoint.safetensors: header metadata (each value JSON-encoded)",
    "train",
    Record(
        {
            "format": Field(Str(), "mnistsum-checkpoint/1"),
            "run_id": RUN_ID,
            "dataset_id": DATASET_ID,
            "config": CONFIG,
            "epoch": Field(EPOCH, "epochs done"),
            "param_groups": Field(ListOf(PARAM_GROUP), "AdamW's param groups"),
            "grad_scaler": Field(
                Record({}, title="object"), "GradScaler state (fp16 only; else empty)", required=False
            ),
            **PROCESSES,
        }
    ),
    "Tensors: `model.<name>` weights, `optim.<param>.<key>` AdamW state.",
    max_bytes=MAX_CHECKPOINT_BYTES,
)

MAX_MISCLASSIFIED = 100  # rows an evaluation lists for the gallery

MISCLASSIFIED_ROW = Record(
    {
        "row": Field(Int(0, MNIST_IMAGES - 1), "row of the split"),
        "image_index": Field(
            Int(0, MNIST_IMAGES - 1), "image in the MNIST set of the split (checked against MNIST when it is loaded)"
        ),
        "number": Field(Int(0, 9), "the row's number"),
        "digit": Field(Int(0, NUM_DIGITS - 1), "true digit"),
        "sum": Field(Int(0, NUM_SUMS - 1), "true sum"),
        "predicted_digit": Field(Int(0, NUM_DIGITS - 1), ""),
        "predicted_sum": Field(Int(0, NUM_SUMS - 1), ""),
        "digit_confidence": Field(SHARE, "softmax probability of the predicted digit"),
        "sum_confidence": Field(SHARE, "softmax probability of the predicted sum"),
    },
    title="misclassified row",
)

EVALUATION = Schema(
    "evaluation_<split>.json",
    "evaluate",
    Record(
        {
            "split": Field(Str(SPLITS), "the split measured"),
            "rows": Field(Int(1, MNIST_IMAGES), "rows measured"),
            "device": Field(Str(), "torch device", required=False),
            "precision": Field(Str(), "fp32", required=False),
            **{name: Field(SHARE, "share of the rows") for name in ("digit_accuracy", "sum_accuracy", "consistency")},
            "digit_loss": Field(LOSS, "mean cross-entropy of the digit head"),
            "sum_loss": Field(LOSS, "mean cross-entropy of the sum head"),
            "per_digit_accuracy": Field(MapOf(SHARE), 'digit accuracy of each true digit, keyed "0"-"9"'),
            "digit_confusion": Field(matrix(NUM_DIGITS), "counts; rows: true digit, columns: predicted"),
            "sum_confusion": Field(matrix(NUM_SUMS), "counts; rows: true sum, columns: predicted"),
            "misclassified_count": Field(COUNT, "rows with a wrong digit or sum"),
            "misclassified": Field(
                ListOf(MISCLASSIFIED_ROW, max_length=MAX_MISCLASSIFIED), f"the first {MAX_MISCLASSIFIED} of them"
            ),
            "model": Field(
                Record(
                    {
                        "path": Field(Str(), "model.safetensors measured"),
                        "sha256": Field(HEX, "its content hash (16 hex digits): tells a stale evaluation"),
                        "run_id": Field(Nullable(RUN), ""),
                        "arch": Field(Nullable(Str()), ""),
                        "epoch": Field(Nullable(EPOCH), ""),
                        "dataset_id": Field(Nullable(HEX), "dataset the model was trained on"),
                    },
                    title="model provenance",
                ),
                "the model measured",
            ),
            "dataset_id": Field(HEX, "the dataset measured"),
            "created_at": Field(Str(), "UTC time, ISO 8601", required=False),
        }
    ),
    "One per split (`evaluate --split <split>`); `plot` draws it.",
    rules=(
        (
            "each confusion matrix counts `rows` rows",
            lambda evaluation: all(
                sum(map(sum, evaluation[f"{head}_confusion"])) == evaluation["rows"] for head in ("digit", "sum")
            ),
        ),
        ("misclassified_count <= rows", lambda evaluation: evaluation["misclassified_count"] <= evaluation["rows"]),
    ),
)

PLOTS_MANIFEST = Schema(
    "plots/manifest.json",
    "plot",
    Record(
        {
            "inputs": Field(
                Record(
                    {
                        "history": Field(Nullable(HEX), "hash of history.json drawn"),
                        "model": Field(Nullable(HEX), "hash of model.safetensors"),
                        "evaluations": Field(MapOf(HEX), "hash of each evaluation drawn, by split"),
                    },
                    title="input hashes",
                ),
                "what the plots were drawn from: `status` compares it with the files now",
            ),
            "files": Field(ListOf(Str()), "the PNG files in plots/"),
        }
    ),
    "Written last, with the PNGs, in one folder swap.",
)

ONNX_META = Schema(
    "model.onnx: metadata_props (each value a plain string)",
    "export",
    Record(
        {
            "format": Field(Str(), "mnistsum-onnx/1"),
            "arch": Field(Str(ARCHITECTURE_NAMES), "the architecture exported"),
            "run_id": RUN_ID,
            "dataset_id": DATASET_ID,
            "model_sha256": Field(
                Str(),
                "content hash (16 hex digits) of the model.safetensors exported: a model.onnx whose hash is not "
                "the current model's is refused",
            ),
            "graph_sha256": Field(Str(), "hash (16 hex digits) of the graph, weights included: tells a damaged file"),
            "inputs": Field(Str(), "the input convention (docs/export.md)"),
            "outputs": Field(Str(), "the outputs, in order"),
            "opset": Field(Str(), "the ONNX opset of the graph"),
            "check": Field(Str(), "how onnxruntime agreed with torch at export (test split rows, max |Δp|)"),
            "package_version": Field(Str(), "mnistsum version that wrote it", required=False),
            "created_at": Field(Str(), "UTC time, ISO 8601", required=False),
        }
    ),
    "One file, weights inside. Inputs `images` (uint8 [N, 28, 28], MNIST form: normalised inside the graph) and "
    "`numbers` (int64 [N], 0-9); outputs `digit_probabilities` [N, 10], `sum_probabilities` [N, 19], "
    "`digit_logits`, `sum_logits`; N is dynamic.",
    max_bytes=MAX_MODEL_BYTES,  # the same weights as model.safetensors, and a graph of a few KB
)

TRIAL_STATES = ("complete", "pruned", "failed")

TRIAL = Schema(
    "trial.json",
    "sweep",
    Record(
        {
            "study": Field(Str(), "the Optuna study (`sweep --study`)"),
            "number": Field(Int(0), "the trial's number in the study (its folder is trial-<number>)"),
            "state": Field(Str(TRIAL_STATES), "how the trial ended"),
            "value": Field(Nullable(Float()), "val sum accuracy of the kept epoch (null when failed)"),
            "seconds": Field(Nullable(Float()), "training seconds (the second objective of --objective accuracy,time)"),
            "epochs_done": Field(Int(0), "epochs finished (a pruned trial stops early)"),
            "run_id": RUN_ID,
            "params": Field(Record({}, title="object"), "the values the trial drew, by setting name"),
            "updated_at": Field(Str(), "UTC time, ISO 8601", required=False),
        }
    ),
    "Written when the trial ends, in the trial's run folder; `runs` shows it when run_id matches history.json's.",
)

SCHEMAS = (
    SPLIT_META,
    HISTORY,
    TRAIN_STATE,
    RUN_SETUP,
    MODEL_META,
    CHECKPOINT_META,
    EVALUATION,
    PLOTS_MANIFEST,
    ONNX_META,
    TRIAL,
)
