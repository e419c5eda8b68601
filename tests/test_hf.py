"""Hugging Face's vision convnets (built from small configs, no weights): planned, compacted exactly,
written with greg_fast.hf.save_pretrained and read back exactly with from_pretrained."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch

import greg_fast as gf
from greg_fast import hf

from test_groups import random_group_masks
from test_user_models import randomize

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

CONFIGS = {
    "ResNetForImageClassification": ("ResNetConfig", dict(embedding_size=16, hidden_sizes=[16, 32, 32, 64],
                                                          depths=[1, 1, 1, 1], num_labels=3)),
    "ConvNextForImageClassification": ("ConvNextConfig", dict(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                                                              num_labels=3)),
    "MobileNetV2ForImageClassification": ("MobileNetV2Config", dict(depth_multiplier=0.35, num_labels=3)),
    "EfficientNetForImageClassification": ("EfficientNetConfig", dict(width_coefficient=1.0, depth_coefficient=0.2,
                                                                      hidden_dim=1280, image_size=64, num_labels=3)),
    "RegNetForImageClassification": ("RegNetConfig", dict(embedding_size=16, hidden_sizes=[16, 32, 32, 64],
                                                          depths=[1, 1, 1, 1], groups_width=8, num_labels=3)),
    # attention from separate projections, its head count inferred (view(..., -1, self.head_dim))
    "ViTForImageClassification": ("ViTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, image_size=64, patch_size=16, num_labels=3)),
    "SwinForImageClassification": ("SwinConfig", dict(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1],
                                                      num_heads=[2, 4], window_size=4, num_labels=3)),
}
X = torch.randn(2, 3, 64, 64)


def logits(model, x=X):
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


# ResNet and ViT in the default run; the others (LayerNorm over channels, depthwise, squeeze-excitation, grouped, windows) under zoo
BREADTH = {"ConvNextForImageClassification", "MobileNetV2ForImageClassification", "EfficientNetForImageClassification",
           "RegNetForImageClassification", "SwinForImageClassification"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.zoo) if n in BREADTH else n for n in CONFIGS])
def test_a_compacted_hugging_face_model_is_saved_and_loaded_back_exactly(tmp_path, name):
    config_name, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    model = randomize(getattr(transformers, name)(getattr(transformers, config_name)(**kwargs))).eval()
    plan = gf.plan(model, 0.5, example_inputs=(X[:1],))
    assert plan.pruned
    if "Swin" in name or "ViT" in name:
        assert list(plan.excluded) == ["classifier"]  # all but the logits: attention and stream too
    masks = random_group_masks(plan, 0.5)
    small, small_plan = copy.deepcopy((model, plan))
    gf.compact(small, masks, small_plan)  # checks itself against the masked copy
    hf.save_pretrained(small, tmp_path / "m")
    assert {"config.json", "model.safetensors", "greg_fast.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    loaded = hf.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(small) and torch.equal(logits(loaded), logits(small))
    with pytest.raises(Exception):  # transformers' own loader builds the dense architecture
        getattr(transformers, name).from_pretrained(tmp_path / "m")


def test_a_widths_file_that_does_not_describe_the_weights_is_refused(tmp_path):
    config_name, kwargs = CONFIGS["ResNetForImageClassification"]
    model = transformers.ResNetForImageClassification(getattr(transformers, config_name)(**kwargs)).eval()
    plan = gf.plan(model, 0.5, example_inputs=(X[:1],))
    gf.compact(model, random_group_masks(plan, 0.5), plan)
    hf.save_pretrained(model, tmp_path / "m")
    record = json.loads((tmp_path / "m" / "greg_fast.json").read_text())
    name = next(iter(record["widths"]))
    record["widths"][name][0] += 1
    (tmp_path / "m" / "greg_fast.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="greg_fast.json does not describe model.safetensors"):
        hf.from_pretrained(tmp_path / "m")
    with pytest.raises(TypeError, match="needs a Hugging Face PreTrainedModel"):
        hf.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


def test_the_trainer_callback_regularizes_then_compacts_and_fine_tunes_in_one_train(tmp_path):
    from greg_fast import data as datasets

    class Digits(torch.utils.data.Dataset):
        def __init__(self, split):
            self.x, self.y = split.tensors

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"pixel_values": self.x[i].expand(3, 8, 8), "labels": self.y[i]}

    config_name, kwargs = CONFIGS["ResNetForImageClassification"]
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(getattr(transformers, config_name)(**{**kwargs, "num_labels": 10}))
    plan = gf.plan(model, 0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
    greg = gf.GrowingReg(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), plan, method="greg1",
                         delta=0.5, interval=1, stabilize=2)
    schedule = torch.optim.lr_scheduler.LambdaLR(greg, lambda step: 1.0)  # of the wrapper
    rates = []
    callback = hf.GRegTrainerCallback(model, make_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: rates.append(step) or 0.1))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=greg.max_steps() + 6,
                                          per_device_train_batch_size=32, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Digits(datasets.load("digits").train),
                                   optimizers=(greg, schedule), callbacks=[callback])
    trainer.train()
    assert callback.compacted and trainer.state.global_step == greg.max_steps() + 6
    assert sum(p.numel() for p in model.parameters()) == plan.cost()["params_after"]
    assert len(rates) >= 6 and trainer.optimizer.optimizer is greg.optimizer  # fine-tuned by the inner SGD
    assert greg.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_the_trainer_callback_refuses_ddp_before_training():
    """The Trainer's loop keeps its DDP wrapper where no callback reaches it: compacting under it would
    leave DDP syncing the replaced parameters, so a world of 2 is refused at the start."""
    callback = hf.GRegTrainerCallback(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="DistributedDataParallel wrapper \\(world size 2\\)"):
        callback.on_train_begin(SimpleNamespace(world_size=2), None, None)
    callback.on_train_begin(SimpleNamespace(world_size=1), None, None)
