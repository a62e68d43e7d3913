"""Identity adapters: conditioners (embedding -> tokens) and injections (attention processors)."""
from training.adapters.residual_attention import (
    ResidualWPlusAttnProcessor,
    WPlusAdapter,
    adapter_state_dict,
    cross_attention_layers,
    install_wplus_adapter,
    load_adapter,
    read_adapter_file,
    save_adapter,
    set_scale,
    uninstall_wplus_adapter,
)
from training.adapters.wproj import WProj

__all__ = [
    "ResidualWPlusAttnProcessor",
    "WPlusAdapter",
    "WProj",
    "adapter_state_dict",
    "cross_attention_layers",
    "install_wplus_adapter",
    "load_adapter",
    "read_adapter_file",
    "save_adapter",
    "set_scale",
    "uninstall_wplus_adapter",
]
