"""Deprecated: jaxlora 0.1's name for `jaxlora.peft_format` (it clashed with the `peft` package); import that instead.

`import jaxlora.peft` and `from jaxlora.peft import load_peft, save_peft` still work and warn once with a
DeprecationWarning; the names are those of `jaxlora.peft_format`.
"""

import warnings as _warnings

from jaxlora.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, load_peft, save_peft

__all__ = ["CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "load_peft", "save_peft"]

_warnings.warn(
    "jaxlora.peft is now jaxlora.peft_format (the old name clashed with the `peft` package): "
    "use `from jaxlora.peft_format import load_peft, save_peft`",
    DeprecationWarning,
    stacklevel=2,
)
