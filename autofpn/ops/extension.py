"""The compiled extension ``autofpn._C`` (cuda_ext/): which of its operators this build has."""
import torch


def extension_has(op_name: str) -> bool:
    """Whether ``autofpn._C`` imports (loading it registers ``torch.ops.autofpn.*``) and holds
    ``torch.ops.autofpn.<op_name>``: False when the extension is not built, or was built before
    that operator was written (each caller then runs its PyTorch path)."""
    try:
        import autofpn._C  # noqa: F401
        getattr(torch.ops.autofpn, op_name)
    except (ImportError, OSError, AttributeError, RuntimeError):
        return False
    return True
