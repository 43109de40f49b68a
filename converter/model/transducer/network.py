"""NeMo's RNNTDecoder (the prediction network) and RNNTJoint at inference, in MLX.

Each LSTM layer keeps torch's two products as two Linear layers (`input`: weight_ih + bias_ih, `hidden`:
weight_hh + bias_hh), so the stored tensors are NeMo's own, `--quantize` treats them as layers like any
other, and the gates sum in torch's order: x W_ih^T + b_ih + h W_hh^T + b_hh, split i, f, g, o.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import JointConfig, PredictionConfig

# NeMo's RNNTJoint accepts these three activations (modules/rnnt.py, _joint_net_modules).
ACTIVATIONS = {"relu": nn.relu, "sigmoid": mx.sigmoid, "tanh": mx.tanh}

LSTMState = tuple[mx.array, mx.array]  # (h, c), each (layers, B, H), torch's layout


class LSTMLayer(nn.Module):
    """One torch.nn.LSTM layer, one time step at a time."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.input = nn.Linear(inputs, 4 * hidden)
        self.hidden = nn.Linear(hidden, 4 * hidden)

    def __call__(self, x: mx.array, h: mx.array, c: mx.array) -> tuple[mx.array, mx.array]:
        gates = self.input(x) + self.hidden(h)
        i, f, g, o = mx.split(gates, 4, axis=-1)  # torch's gate order
        c = mx.sigmoid(f) * c + mx.sigmoid(i) * mx.tanh(g)
        h = mx.sigmoid(o) * mx.tanh(c)
        return h, c


class PredictionNetwork(nn.Module):
    """Label -> embedding (the blank's row is zeros: NeMo's blank_as_pad) -> stacked LSTM, with its state."""

    def __init__(self, config: PredictionConfig):
        super().__init__()
        self.hidden_size = config.pred_hidden
        self.embed = nn.Embedding(config.vocab_size + 1, config.pred_hidden)
        self.lstm = [LSTMLayer(config.pred_hidden, config.pred_hidden) for _ in range(config.pred_rnn_layers)]

    def initial_state(self, batch: int, dtype: mx.Dtype = mx.float32) -> LSTMState:
        """NeMo starts from no state, which torch's LSTM reads as zeros."""
        shape = (len(self.lstm), batch, self.hidden_size)
        return mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype)

    def __call__(self, labels: mx.array, state: LSTMState) -> tuple[mx.array, LSTMState]:
        """labels (B,) -> output (B, H) and the new state (one step, as NeMo's predict(add_sos=False))."""
        return self._step(self.embed(labels), state)

    def _step(self, x: mx.array, state: LSTMState) -> tuple[mx.array, LSTMState]:
        hs, cs = [], []
        for index, layer in enumerate(self.lstm):
            x, c = layer(x, state[0][index], state[1][index])
            hs.append(x)
            cs.append(c)
        return x, (mx.stack(hs), mx.stack(cs))

    def sequence(self, labels: mx.array) -> mx.array:
        """Teacher-forced outputs (B, U+1, H) for labels (B, U), with NeMo's start-of-sequence zero vector
        first (RNNTDecoder.forward's add_sos): output u has read the labels before u."""
        batch, steps = labels.shape
        dtype = self.lstm[0].hidden.bias.dtype  # biases stay in float when the weights are quantized
        state = self.initial_state(batch, dtype)
        inputs = [mx.zeros((batch, self.hidden_size), dtype=dtype)]
        if steps:
            embedded = self.embed(labels)
            inputs += [embedded[:, step] for step in range(steps)]
        outputs = []
        for x in inputs:
            y, state = self._step(x, state)
            outputs.append(y)
        return mx.stack(outputs, axis=1)


class Joint(nn.Module):
    """enc and pred projections, summed, activation, then the output layer (NeMo's joint_net minus dropout)."""

    def __init__(self, config: JointConfig, enc_hidden: int, pred_hidden: int, num_outputs: int):
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported joint activation {config.activation!r}")
        self.activation_name = config.activation  # NeMo's name: what the C search (cpu/label_looping.py) reads
        self.enc = nn.Linear(enc_hidden, config.joint_hidden)
        self.pred = nn.Linear(pred_hidden, config.joint_hidden)
        self.net = nn.Linear(config.joint_hidden, num_outputs)

    def __call__(self, enc_projected: mx.array, pred_projected: mx.array) -> mx.array:
        """Projected encoder and prediction outputs (broadcastable) -> logits (..., num_outputs)."""
        return self.net(ACTIVATIONS[self.activation_name](enc_projected + pred_projected))
