"""Read dlib's serialized DNN files (``dlib::serialize(net)``) in pure Python + numpy.

This follows dlib's own serializers (``dlib/serialize.h``, ``dlib/dnn/{core,layers,input,loss,tensor}.h``):

- integers: one control byte (low nibble = number of bytes, bit 0x80 = negative) then the
  magnitude, little-endian;
- ``float``/``double``: a ``float_details`` pair, int64 mantissa then int16 exponent, value =
  mantissa * 2**exponent (exponents 32000/32001/32002 mean +inf/-inf/nan);
- ``bool``: one ASCII byte, ``'1'`` or ``'0'``; ``char``/``uint8_t``: one raw byte; strings: length (integer)
  then the bytes;
- ``resizable_tensor``: version (2: raw little-endian float32 data, 1: one dlib float per value),
  then num_samples, k, nr, nc, then the values; ``alias_tensor``: version 1 then the four dims.

A network is nested: ``add_loss_layer`` writes (version, loss details, subnetwork); every
``add_layer`` writes (version, *subnetwork*, details, bookkeeping); ``add_tag_layer`` and
``add_skip_layer`` write (version, subnetwork). So the file holds the wrapper versions from the
output down to the input, then the input layer, then each layer's details from the input up.
Tags and skips leave no trace but their version (1), which is why :class:`DlibNet` records them
as ``"tag_or_skip"``: which tag a skip jumps to is part of the C++ type, not of the file, so the
model that consumes the parse (``dlib_resnet``) supplies the topology and checks it against
this layer sequence.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from pdsn_cli.errors import SchemaError

# float_details special exponents
_IS_INF, _IS_NINF, _IS_NAN = 32000, 32001, 32002


class _Truncated(Exception):
    pass


class DlibReader:
    """A cursor over the bytes of a dlib-serialized stream (primitive decoders only)."""

    def __init__(self, data: bytes | memoryview, name: str = "<bytes>"):
        self.buf = memoryview(data)
        self.pos = 0
        self.name = name

    # -- primitives -------------------------------------------------------------------------

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated()
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def peek_byte(self) -> int | None:
        return self.buf[self.pos] if self.pos < len(self.buf) else None

    def int(self) -> int:
        ctrl = self._take(1)[0]
        size = ctrl & 0x0F
        if size == 0 or size > 8 or ctrl & 0x70:
            raise self.error(f"bad integer control byte 0x{ctrl:02x}")
        value = int.from_bytes(self._take(size), "little")
        return -value if ctrl & 0x80 else value

    def float(self) -> float:
        first = self.peek_byte()
        if first is not None and first & 0x70:
            # dlib's pre-2013 ASCII float format; no network file we support uses it
            raise self.error("old ASCII float encoding is not supported")
        mantissa = self.int()
        exponent = self.int()
        if exponent == _IS_INF:
            return math.inf
        if exponent == _IS_NINF:
            return -math.inf
        if exponent == _IS_NAN:
            return math.nan
        return math.ldexp(float(mantissa), exponent)

    def bool(self) -> bool:
        ch = self._take(1)[0]
        if ch not in (ord("0"), ord("1")):
            raise self.error(f"bad bool byte 0x{ch:02x}")
        return ch == ord("1")

    def byte(self) -> int:
        """A ``char``/``uint8_t``: dlib writes these as one raw byte, not as an integer."""
        return self._take(1)[0]

    def string(self, max_len: int = 1 << 16) -> str:
        n = self.int()
        if not 0 <= n <= max_len:
            raise self.error(f"implausible string length {n}")
        raw = bytes(self._take(n))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error("non-ASCII string") from None

    def peek_string(self, max_len: int = 64) -> str | None:
        """The string at the cursor if there is a plausible identifier there, without consuming it."""
        start = self.pos
        try:
            s = self.string(max_len)
        except (SchemaError, _Truncated):
            s = None
        self.pos = start
        return s if s and s.replace("_", "a").isalnum() else None

    def tensor(self) -> np.ndarray:
        """A ``resizable_tensor``, as a float32 array of shape (num_samples, k, nr, nc)."""
        version = self.int()
        dims = tuple(self.int() for _ in range(4))
        if any(d < 0 for d in dims):
            raise self.error(f"negative tensor dims {dims}")
        count = math.prod(dims)
        if version == 2:
            raw = self._take(4 * count)
            return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)
        if version == 1:
            return np.array([self.float() for _ in range(count)], dtype=np.float32).reshape(dims)
        raise self.error(f"unknown tensor version {version}")

    def alias_tensor(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise self.error(f"unknown alias_tensor version {version}")
        return tuple(self.int() for _ in range(4))

    def error(self, what: str) -> SchemaError:
        return SchemaError(f"{self.name}: not a dlib network file ({what} at byte {self.pos})")


# ------------------------------------------------------------------------------------------


@dataclass
class DlibLayer:
    """One layer as stored in the file.

    ``kind`` is the layer type without dlib's version suffix ("con", "affine", "relu", "max_pool",
    "avg_pool", "add_prev", "fc", "tag_or_skip", "input_rgb_image_sized", "input_rgb_image_pyramid",
    "loss_metric", "loss_mmod");
    ``arrays`` holds its parameters already shaped the dlib way (conv weight O×I×kh×kw, fc weight
    num_inputs×num_outputs, per-channel vectors flat); ``attrs`` its hyper-parameters.
    """

    kind: str
    version: str = ""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, float | int | bool | str] = field(default_factory=dict)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.arrays.items())
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"DlibLayer({self.kind}{': ' + attrs if attrs else ''}{'; ' + shapes if shapes else ''})"


@dataclass
class DlibNet:
    input: DlibLayer
    #: every layer from the input up to the output, tags and skips included as "tag_or_skip"
    layers: list[DlibLayer]
    loss: DlibLayer | None = None

    def kinds(self) -> list[str]:
        return [layer.kind for layer in self.layers]


def _split_params(r: DlibReader, params: np.ndarray, pieces: list[tuple[str, tuple[int, ...]]]) -> dict:
    flat = params.reshape(-1)
    need = sum(math.prod(s) for _, s in pieces)
    if need != flat.size:
        raise r.error(f"parameter tensor has {flat.size} values, its aliases need {need}")
    out, offset = {}, 0
    for name, shape in pieces:
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].reshape(shape).copy()
        offset += n
    return out


def _read_details(r: DlibReader) -> DlibLayer:
    """The ``serialize(details)`` part of an add_layer, dispatched on its version string."""
    start = r.pos
    version = r.string(256)
    if version in ("con_4", "con_5"):
        params = r.tensor()
        num_filters, nr, nc = r.int(), r.int(), r.int()
        stride_y, stride_x, pad_y, pad_x = r.int(), r.int(), r.int(), r.int()
        filt, bias = r.alias_tensor(), r.alias_tensor()
        for _ in range(4):  # learning-rate / weight-decay multipliers: training only
            r.float()
        use_bias = r.bool() if version == "con_5" else True
        pieces = [("weight", filt)] + ([("bias", (bias[1],))] if use_bias else [])
        if filt[0] != num_filters or filt[2:] != (nr, nc):
            raise r.error(f"conv filter alias {filt} does not match {num_filters} filters of {nr}x{nc}")
        arrays = _split_params(r, params, pieces)
        attrs = dict(num_filters=num_filters, kernel=(nr, nc), stride=(stride_y, stride_x), padding=(pad_y, pad_x))
        return DlibLayer("con", version, arrays, attrs)
    if version == "affine_":
        params = r.tensor()
        gamma, beta = r.alias_tensor(), r.alias_tensor()
        mode = r.int()
        arrays = _split_params(r, params, [("gamma", (math.prod(gamma),)), ("beta", (math.prod(beta),))])
        return DlibLayer("affine", version, arrays, dict(mode="conv" if mode == 0 else "fc"))
    if version in ("bn_con2", "bn_fc2"):
        # A batch-norm layer as saved during training; dlib's affine_ converts it on load with
        # gamma/sqrt(var+eps), beta - gamma'*mean. Doing the same here keeps such files loadable.
        params = r.tensor()
        gamma, beta = r.alias_tensor(), r.alias_tensor()
        r.tensor(), r.tensor()  # batch means / invstds of the last training step
        running_means, running_vars = r.tensor().reshape(-1), r.tensor().reshape(-1)
        r.int(), r.int()  # num_updates, running_stats_window_size
        for _ in range(4):
            r.float()
        eps = r.float()
        p = _split_params(r, params, [("gamma", (math.prod(gamma),)), ("beta", (math.prod(beta),))])
        g = (p["gamma"].astype(np.float64) / np.sqrt(running_vars.astype(np.float64) + eps)).astype(np.float32)
        b = (p["beta"] - g * running_means).astype(np.float32)
        mode = "conv" if version == "bn_con2" else "fc"
        return DlibLayer("affine", version, {"gamma": g, "beta": b}, dict(mode=mode))
    if version in ("relu_", "add_prev_"):
        return DlibLayer(version.rstrip("_"), version)
    if version in ("max_pool_2", "avg_pool_2"):
        nr, nc = r.int(), r.int()
        stride_y, stride_x, pad_y, pad_x = r.int(), r.int(), r.int(), r.int()
        attrs = dict(kernel=(nr, nc), stride=(stride_y, stride_x), padding=(pad_y, pad_x))
        return DlibLayer(version[:-2], version, {}, attrs)
    if version == "fc_2":
        num_outputs, num_inputs = r.int(), r.int()
        params = r.tensor()
        weights, biases = r.alias_tensor(), r.alias_tensor()
        bias_mode = r.int()  # 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS
        for _ in range(4):
            r.float()
        pieces = [("weight", (num_inputs, num_outputs))]
        if bias_mode == 0:
            pieces.append(("bias", (num_outputs,)))
        if weights[:2] != (num_inputs, num_outputs):
            raise r.error(f"fc weight alias {weights} does not match {num_inputs}x{num_outputs}")
        return DlibLayer("fc", version, _split_params(r, params, pieces), dict(num_outputs=num_outputs))
    r.pos = start
    raise r.error(f"unsupported layer type {version!r}")


def _read_input(r: DlibReader) -> DlibLayer:
    version = r.string(256)
    if version == "input_rgb_image_sized":
        mean = (r.float(), r.float(), r.float())
        nr, nc = r.int(), r.int()
        return DlibLayer(version, version, {}, dict(mean_rgb=mean, size=(nr, nc)))
    if version == "input_rgb_image":
        mean = (r.float(), r.float(), r.float())
        return DlibLayer(version, version, {}, dict(mean_rgb=mean))
    if version in ("input_rgb_image_pyramid", "input_rgb_image_pyramid2"):
        # The pyramid type (e.g. pyramid_down<6>) is part of the C++ type, not of the file. Files
        # written before the "2" version carry no paddings; dlib then uses 10 and 11.
        mean = (r.float(), r.float(), r.float())
        padding, outer_padding = (r.int(), r.int()) if version.endswith("2") else (10, 11)
        attrs = dict(mean_rgb=mean, pyramid_padding=padding, pyramid_outer_padding=outer_padding)
        return DlibLayer("input_rgb_image_pyramid", version, {}, attrs)
    raise r.error(f"unsupported input layer {version!r}")


def _read_loss(r: DlibReader) -> DlibLayer:
    version = r.string(256)
    if version == "loss_metric_2":
        return DlibLayer("loss_metric", version, {}, dict(margin=r.float(), distance_threshold=r.float()))
    if version == "loss_mmod_":
        return DlibLayer("loss_mmod", version, {}, _read_mmod_options(r))
    raise r.error(f"unsupported loss layer {version!r}")


def _read_mmod_options(r: DlibReader) -> dict:
    """``mmod_options`` (versions 1 to 4); fields a version lacks get dlib's defaults."""
    version = r.int()
    if not 1 <= version <= 4:
        raise r.error(f"unknown mmod_options version {version}")
    if version == 1:
        windows = [(r.int(), r.int(), "")]  # a single detector window, width then height
    else:
        windows = []
        for _ in range(r.int()):
            window_version = r.int()
            if window_version not in (1, 2):
                raise r.error(f"unknown detector window version {window_version}")
            width, height = r.int(), r.int()
            windows.append((width, height, r.string() if window_version == 2 else ""))
    attrs = dict(detector_windows=windows, loss_per_false_alarm=r.float(), loss_per_missed_target=r.float(),
                 truth_match_iou_threshold=r.float())
    # test_box_overlap: (iou_thresh, percent_covered_thresh)
    attrs["overlaps_nms"] = (r.float(), r.float())
    attrs["overlaps_ignore"] = (r.float(), r.float())
    attrs["assume_image_pyramid"] = bool(r.byte()) if version >= 3 else True  # use_image_pyramid: uint8_t
    bbr = (r.bool(), r.float()) if version >= 4 else (False, 100.0)
    attrs["use_bounding_box_regression"], attrs["bbr_lambda"] = bbr
    return attrs


def _skip_layer_state(r: DlibReader, add_layer_version: int, bottom: bool) -> None:
    """The bookkeeping an add_layer writes after its details (flags and gradient buffers)."""
    r.bool(), r.bool(), r.bool()  # setup called, gradient stale, output getters disabled
    r.tensor(), r.tensor()  # x_grad, cached_output
    if bottom:
        r.tensor()  # grad_final
        if add_layer_version >= 3:
            r.int()  # sample expansion factor
    elif add_layer_version >= 2:
        r.tensor()  # params_grad


def read_net(data: bytes | memoryview, name: str = "<bytes>") -> DlibNet:
    r = DlibReader(data, name)
    try:
        loss = None
        version = r.int()
        if (r.peek_string() or "").startswith("loss_"):
            if version != 1:
                raise r.error(f"unknown add_loss_layer version {version}")
            loss = _read_loss(r)
            version = r.int()
        # Wrapper versions, output first, until the input layer's name shows up. add_layer
        # writes 2 (its bottom one, over the input, 2 or 3); tag and skip layers write 1.
        wrappers: list[int] = []
        while not (r.peek_string() or "").startswith("input"):
            if version not in (1, 2):
                raise r.error(f"unexpected layer version {version}")
            wrappers.append(version)
            if len(wrappers) > 100_000:
                raise r.error("no input layer found")
            version = r.int()
        if version not in (2, 3):
            raise r.error(f"unexpected bottom add_layer version {version}")
        input_layer = _read_input(r)
        layers = [_read_details(r)]
        _skip_layer_state(r, version, bottom=True)
        for v in reversed(wrappers):
            if v == 1:
                layers.append(DlibLayer("tag_or_skip"))
            else:
                layers.append(_read_details(r))
                _skip_layer_state(r, v, bottom=False)
        if r.pos != len(r.buf):
            raise r.error(f"{len(r.buf) - r.pos} unread bytes after the network")
    except _Truncated:
        raise r.error("file ends early") from None
    return DlibNet(input=input_layer, layers=layers, loss=loss)


def read_net_file(path: str | os.PathLike) -> DlibNet:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SchemaError(f"weights file not found: {path}") from None
    except IsADirectoryError:
        raise SchemaError(f"weights path is a folder, not a dlib .dat file: {path}") from None
    return read_net(data, name=path)


__all__ = ["DlibLayer", "DlibNet", "DlibReader", "read_net", "read_net_file"]
