"""Makes Triton 3.6's interpreter run loops whose bounds are read from memory under numpy >= 2.4.

The interpreter turns a loaded scalar into a Python int with ``int(array of shape (1,))``, which numpy 2.4
refuses; the kernels' loop bounds come from the mask (``kv_num_blocks``). Same conversion, through the
element instead. Import this before any kernel runs, in a process started with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import numpy as np
import triton.runtime.interpreter as _interp

if hasattr(_interp, "_patch_lang_tensor") and not getattr(_interp, "_dit_accel_patched", False):
    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
    _interp._dit_accel_patched = True
