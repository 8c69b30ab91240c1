"""The README's own-model example runs as written (with a small model standing in for yours)."""
import pathlib
import re

import numpy as np
import torch
from torch import nn

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


class TinyVQA(nn.Module):
    def __init__(self, vocab_size, n_answers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.fuse = nn.Linear(8, 16)
        self.classifier = nn.Linear(16, n_answers)

    def forward(self, image, question):
        v = torch.tanh(self.conv(image)).mean((2, 3))
        q = self.embed(question).sum(1)
        return self.classifier(torch.relu(self.fuse(v * q)))


def test_the_own_model_example_runs():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Your own model.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    vocab = ["[PAD]", "[UNK]", "what", "colour", "is", "the", "car"]
    rng = np.random.default_rng(0)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(6)]
    namespace = {
        "my_model": TinyVQA(len(vocab), 3), "my_vocab": vocab, "my_answers": ["red", "blue", "grey"],
        "my_image_array": images[0], "images": images,
        "questions": ["what colour is the car?"] * 6, "answers": [0, 1, 2, 0, 1, 2],
    }
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["ig"].scores["image"].shape == (4,)
    assert namespace["sog"].matrix.shape == (4, 5)
