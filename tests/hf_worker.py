"""One replica of the Hugging Face Trainer test (run by tests/test_training_hf.py under torchrun).

Each process trains its own tiny BERT with its own data, seed and learning rate for 5 steps;
`ModelStockCallback(period=2)` merges after steps 2 and 4 and at the end. The weights just before
the final merge and after it are saved, with the merges' steps and the Trainer's view of the run.
"""

from __future__ import annotations

import copy
import json
import sys

import torch

from modelstock.training.hf import ModelStockCallback, init_replica_process_group

replica = init_replica_process_group(timeout=120)

from transformers import (  # noqa: E402  (after the process group: the Trainer must not see torchrun)
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

out = sys.argv[1]
torch.manual_seed(0)
config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=16, num_labels=3)
pretrained = BertForSequenceClassification(config)
model = copy.deepcopy(pretrained)
g = torch.Generator().manual_seed(replica)
data = [{"input_ids": torch.randint(0, 50, (8,), generator=g),
         "labels": int(torch.randint(0, 3, (), generator=g))} for _ in range(64)]


class SnapshotBeforeLastMerge(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == state.max_steps:
            torch.save({k: v.clone() for k, v in model.state_dict().items()},
                       f"{out}/pre{replica}.pt")


args = TrainingArguments(output_dir=f"{out}/trainer{replica}", max_steps=5,
                         per_device_train_batch_size=8, learning_rate=1e-3 * (1 + replica),
                         use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                         seed=replica, disable_tqdm=True)
callback = ModelStockCallback(anchor=pretrained, period=2)
trainer = Trainer(model=model, args=args, train_dataset=data,
                  callbacks=[SnapshotBeforeLastMerge(), callback])
trainer.train()
torch.save(model.state_dict(), f"{out}/post{replica}.pt")
with open(f"{out}/run{replica}.json", "w") as f:
    json.dump({"world_size": args.world_size, "parallel_mode": str(args.parallel_mode),
               "ddp": type(trainer.model_wrapped).__name__,
               "merges": [e for e in trainer.state.log_history if "modelstock_merge" in e]}, f)
