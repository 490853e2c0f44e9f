"""A measured bound on one design for a ``train`` run's fixed cost (issue 24): MLflow's side in a second process
beside training instead of after it in the same one. Not the product's path; ``train_fixed_cost.py --beside``
runs it interleaved with the real command.

The child process is started first. It imports MLflow, opens the store, starts the run and logs its params, then
imports torch and builds the model, while this process imports torch, loads the data and trains with no tracking.
After the last epoch this process hands the child the trained weights (a file) and the history, so that the child
exports the model while this process evaluates the test set; then it hands over the test results, and the child
logs the final metrics and the two plots and ends the run. It logs less than a tracked run (no per-epoch metrics
while training, no dataset inputs, no checkpoints, no system metrics), so its time is a lower bound for the
design. Prints one JSON line with the wall time until both processes are done and the training epochs' seconds.

    .venv/bin/python benchmarks/tracking_beside.py sqlite:///PATH/mlflow.db --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
TRAIN = dict(model="cifar_cnn", dataset="cifar10", epochs=1, train_subset=2000)
CHILD = r"""
import json, sys
from sweepbench.tracking.store import Store
store = Store(sys.argv[1])
settings = json.loads(sys.argv[2])
run_id = store.start_run(store.experiment("tracking-beside"), "beside", "train", {}, settings)
import torch
from sweepbench import report
from sweepbench.models import create_model
from sweepbench.tracking.models import log_model
model = create_model(settings["model"])
trained = json.loads(sys.stdin.readline())
model.load_state_dict(torch.load(trained["weights"]))
store.log(run_id, metrics={"train_loss": trained["train_loss"], "val_accuracy": trained["val_accuracy"]})
log_model(store, run_id, model, torch.load(trained["example"]).numpy(), trained["epochs"])
tested = json.loads(sys.stdin.readline())
store.log(run_id, metrics={"test_accuracy": tested["test_accuracy"]})
store.log_figure(run_id, report.plot_confusion_matrix(tested["confusion"], tested["classes"]), "confusion_matrix.png")
store.end_run(run_id, "FINISHED")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tracking_uri")
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    child = subprocess.Popen([sys.executable, "-c", CHILD, args.tracking_uri, json.dumps(TRAIN)],
                             stdin=subprocess.PIPE, text=True)

    import torch  # only now, so that the child's imports run beside these (hence the callback class in here)

    from sweepbench.config import RunConfig
    from sweepbench.engine import Callback, train
    from sweepbench.engine.loaders import normalise

    class HandOver(Callback):
        """Sends the child the trained model after the last epoch (through files in ``folder``), the test
        results at the end."""

        def __init__(self, child: subprocess.Popen, folder: Path) -> None:
            self.child, self.folder = child, folder

        def on_epoch_end(self, context, record) -> None:
            if record.epoch < context.config.epochs:
                return
            dataset, weights, example = context.dataset, self.folder / "weights.pt", self.folder / "example.pt"
            torch.save(context.model.state_dict(), weights)
            torch.save(normalise(dataset.x_val[:4], dataset.mean, dataset.std), example)
            self.send({"weights": str(weights), "example": str(example),
                       "epochs": record.epoch, "train_loss": record.train_loss,
                       "val_accuracy": record.val_accuracy})

        def on_train_end(self, context, result) -> None:
            self.send({"test_accuracy": result.test_accuracy, "confusion": result.confusion_matrix,
                       "classes": list(context.dataset.classes)})

        def send(self, message: dict) -> None:
            self.child.stdin.write(json.dumps(message) + "\n")
            self.child.stdin.flush()

    with tempfile.TemporaryDirectory(prefix="sweepbench-beside-") as folder:
        result = train(RunConfig(**TRAIN, data_dir=args.data_dir), [HandOver(child, Path(folder))])
        if child.wait() != 0:
            raise SystemExit(f"the tracking process exited {child.returncode}")
    print(json.dumps({"wall_seconds": time.perf_counter() - STARTED,
                      "epoch_seconds": [record.epoch_seconds for record in result.history]}))


if __name__ == "__main__":
    main()
