"""The MLflow ``pyfunc`` face of an mqgen bundle, logged as *model code* (MLflow's models-from-code): MLflow
copies this file into the model and runs it on ``mlflow.pyfunc.load_model``; no Python object is pickled.
It is never imported by mqgen itself (it calls ``set_model`` at import).

- A generator model: ``predict`` takes rows ``{"n": int, "class": int (-1 = none), "seed": int,
  "guidance_scale": float, "prompt": str}`` (``prompt``: the caption of a text-conditional model, required there
  and refused elsewhere) and returns the sampled images of every row, uint8 ``[N, C, H, W]``.
- A tokenizer model: ``predict`` takes uint8 images ``[N, C, H, W]`` and returns ``[N, 2, K]`` int64: the kept
  codes and their positions (raster order).

The weights are the bundle's safetensors, checked against its ``model_index.json`` on load
(:func:`infra.bundle.read_bundle`). Needs mqgen installed where the model is loaded.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model


class MqgenModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        from infra.bundle import read_bundle
        from infra.refs import caption_tokenizer, load_generator, load_tokenizer

        self.bundle = read_bundle(context.artifacts["bundle"])
        self.device = torch.device("cpu")
        self.tokenizer = load_tokenizer(self.bundle.tokenizer, self.device)
        self.generator = load_generator(self.bundle.generator, self.device) if self.bundle.generator else None
        text = self.bundle.generator is not None and self.bundle.generator.text_len
        self.captions = caption_tokenizer(self.bundle.generator) if text else None

    # no type hints here: MLflow would try to validate inputs from them; the logged signature says what is expected
    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from infra.config import SamplingSection, sampling_params
        from infra.viz import to_uint8
        from models.stackformer import sample_tokens

        if self.generator is None:  # a tokenizer: images in, kept codes and positions out
            images = torch.as_tensor(np.asarray(model_input), dtype=torch.uint8)
            with torch.inference_mode():
                out = self.tokenizer.encode(images.float() / 127.5 - 1)
            return torch.stack([out.codes, out.positions], 1).numpy()
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        code_params, pos_params = sampling_params(SamplingSection())
        batches = []
        for row in rows:
            n, cls, seed = int(row["n"]), int(_given(row, "class", -1)), int(_given(row, "seed", 0))
            scale = float(_given(row, "guidance_scale", 1.0))  # classifier-free guidance; 1 = none
            labels = torch.full((n,), cls, dtype=torch.long) if self.bundle.num_classes and cls >= 0 else None
            if self.bundle.num_classes and labels is None:
                labels = torch.arange(n) % self.bundle.num_classes
            text = self._caption_ids(_given(row, "prompt", None), n)
            g = torch.Generator().manual_seed(seed)
            with torch.inference_mode():
                codes, positions, _ = sample_tokens(self.generator, n, labels, code_params, pos_params, generator=g,
                                                    guidance_scale=scale, text=text)
                batches.append(to_uint8(self.tokenizer.decode(codes, positions)))
        return torch.cat(batches).numpy()


    def _caption_ids(self, prompt, n):
        if self.captions is None:
            if prompt:
                raise ValueError("a prompt was given, but this model is not text-conditional")
            return None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("this model is text-conditional: give each row a 'prompt' (a caption)")
        return self.captions.prompt_ids(prompt, self.bundle.generator.text_len, n)[0]


def _given(row, name, default):  # a column left empty in some rows reads as NaN
    value = row.get(name)
    return default if value is None or value != value else value  # noqa: PLR0124 - NaN (any float type)


set_model(MqgenModel())
