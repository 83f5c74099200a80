"""BatchEncoding: the dict of model inputs that the tokenizer, the image processor and the processor return."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class BatchEncoding(dict):
    """A dict of model inputs with attribute access, tensor conversion and `.to(device, dtype)`.

    `.to(dtype)` casts only floating tensors (pixel_values), so `input_ids` stay integer.
    """

    def __init__(self, data: dict | None = None, tensor_type: str | None = None, encodings: list | None = None):
        super().__init__(data or {})
        self._encodings = encodings
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getstate__(self):
        return {"data": dict(self), "encodings": self._encodings}

    def __setstate__(self, state):
        self.update(state["data"])
        self._encodings = state.get("encodings")

    def __reduce__(self):
        return (self.__class__, (dict(self),), {"data": {}, "encodings": self._encodings})

    @property
    def encodings(self):
        return self._encodings

    def tokens(self, batch_index: int = 0) -> list[str]:
        return self._encodings[batch_index].tokens

    def convert_to_tensors(self, tensor_type: str | None = None) -> "BatchEncoding":
        if tensor_type is None:
            return self
        tensor_type = str(getattr(tensor_type, "value", tensor_type))
        for k, v in list(self.items()):
            if isinstance(v, str) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], str)):
                continue
            try:
                if tensor_type == "pt":
                    if torch.is_tensor(v):
                        continue
                    if isinstance(v, (list, tuple)) and v and torch.is_tensor(v[0]):
                        self[k] = torch.stack(list(v))
                    elif isinstance(v, np.ndarray) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], np.ndarray)):
                        self[k] = torch.from_numpy(np.array(v))
                    else:
                        self[k] = torch.tensor(v)
                elif tensor_type == "np":
                    self[k] = np.asarray(v)
                else:
                    raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {tensor_type!r}")
            except ValueError as e:
                if "return_tensors must be" in str(e):
                    raise
                raise ValueError(f"cannot make a tensor of '{k}' ({e}); its rows differ in length: pass "
                                 "padding=True (or padding='max_length'), or return_tensors=None") from e
        return self

    def to(self, *args: Any, **kwargs: Any) -> "BatchEncoding":
        """Move tensors to a device; a dtype argument applies to floating tensors only."""
        device = kwargs.get("device")
        if device is None and args:
            if isinstance(args[0], torch.dtype):
                pass
            elif isinstance(args[0], (str, int, torch.device)):
                device = args[0]
            else:
                raise ValueError(f"cannot move a BatchEncoding to {args[0]!r}")
        non_blocking = kwargs.get("non_blocking", False)

        def move(v):
            if isinstance(v, torch.Tensor) and torch.is_floating_point(v):
                return v.to(*args, **kwargs)
            if isinstance(v, torch.Tensor) and device is not None:
                return v.to(device=device, non_blocking=non_blocking)
            if isinstance(v, (list, tuple)):
                return type(v)(move(x) for x in v)
            return v

        for k in list(self.keys()):
            self[k] = move(self[k])
        return self
