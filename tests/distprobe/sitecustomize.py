"""Observer for tests/test_distributed.py, imported by Python at start-up only when this folder is on
PYTHONPATH and SQLTUNE_PROBE_DIR is set. It records what each torchrun rank trains on (the global step,
a hash of every row of the batch and of the tokenizer's vocabulary) into SQLTUNE_PROBE_DIR/rank<RANK>.jsonl; training is unchanged."""

import os

if os.environ.get("SQLTUNE_PROBE_DIR"):
    import hashlib
    import json

    import transformers

    _step = transformers.Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        rows = []
        for i in range(ids.shape[0]):
            row = ids[i][mask[i].bool()] if mask is not None else ids[i]
            rows.append(hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16])
        if not hasattr(self, "_probe_vocab"):  # the token ids must mean the same on every rank
            vocab = sorted(self.processing_class.get_vocab().items())
            self._probe_vocab = hashlib.sha1(json.dumps(vocab).encode()).hexdigest()[:16]
        path = os.path.join(os.environ["SQLTUNE_PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"run": os.environ.get("SQLTUNE_PROBE_RUN", ""), "step": self.state.global_step,
                                "rows": rows, "vocab": self._probe_vocab}) + "\n")
        return _step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = training_step
