"""HybridStep in your own training loop: the shipped tiny CLIP, MoE adapters on both towers, the vision tower
trained zeroth-order with the MoZO rule and the language tower first-order, a few steps on one task of the
demo stream. Runs in a few seconds on a CPU: python examples/hybrid_step_loop.py

The lines the README shows ("Using HybridStep in your own loop") are taken from this file; tests/test_examples.py
runs it and checks that the README's block still matches it.
"""
import torch

import mozo
from mozo.data.demo_stream import build_demo_scenario
from mozo.data.loader import TransformedDataset, make_loader
from mozo.data.transforms import make_transform

torch.manual_seed(0)
backbone = mozo.load_backbone("tiny")  # or "openai/clip-vit-base-patch16", a save_pretrained folder, a checkpoint
model = mozo.MozoCLIP(backbone, mozo.PeftConfig(kind="moe"))  # MoE adapters on every layer of both towers
step = mozo.HybridStep(model, "vision-zo", mozo.ZOConfig(rule="mozo", lr=1e-4), fo_lr=1e-3, seed=0)

# Data: the first task of the demo stream (handwritten digits), a small shuffled loader with CLIP's preprocessing.
task = build_demo_scenario(seed=0, train_per_class=4, test_per_class=1, num_tasks=1).tasks[0]
images = TransformedDataset(task.train, make_transform(True, backbone.image_size, backbone.mean, backbone.std),
                            label_map={label: label - task.label_offset for label in task.labels})
batches = [(pixels, labels) for pixels, labels, _ in make_loader(images, batch_size=8, shuffle=True)][:4]
classnames = task.classnames  # labels index these

text_inputs = backbone.tokenize([f"a photo of a {c}." for c in classnames], padding="longest")
for i, (pixels, labels) in enumerate(batches):
    step.set_lr(fo=1e-3, zo=1e-4)  # your schedule here
    stats = step(pixels, labels, text_inputs)  # language units: one backward (AdamW); vision units: a ZO estimate
    print(f"step {i + 1}: loss {stats.loss:.4f}, forwards {stats.forward_passes}, backwards {stats.backward_passes}")

print("trainable parameters:", model.trainable_parameter_counts())
