import pytest

from clipkit.registry import Registry, UnknownNameError, UnknownOptionError


def test_register_build_and_suggest():
    reg = Registry("loss")

    @reg.register("siglip")
    class Sig:
        def __init__(self, bias: float = 0.0):
            self.bias = bias

    assert reg.names() == ["siglip"]
    assert reg.build("siglip", bias=2.0).bias == 2.0
    with pytest.raises(UnknownNameError, match="unknown loss 'sigclip'; did you mean 'siglip'"):
        reg.build("sigclip")
    with pytest.raises(UnknownOptionError, match="no option 'bais'; did you mean 'bias'"):
        reg.build("siglip", bais=1.0)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("siglip")(Sig)
