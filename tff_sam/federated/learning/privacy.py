"""Client-level differential privacy: TFF's DP mean, and the privacy spent (epsilon).

With `--dp_noise_multiplier=z > 0` each round's aggregate is TFF's
`DifferentiallyPrivateFactory` (DP-FedAvg, McMahan et al. 2018): every sampled
client's update is clipped to an L2 norm C, the clipped updates are summed, Gaussian
noise of standard deviation z * C is added, and the sum is divided by the expected
number of clients per round (an unweighted mean: each client counts once, whatever its
number of examples). C is fixed (`--dp_clip_norm`) or adaptive (`gaussian_adaptive`,
Andrew et al. 2021: C tracks the `--dp_target_quantile` of the clients' norms through
a noised count, whose noise TFF folds into z so the whole round is a Gaussian
mechanism of multiplier z).

`epsilon` is the privacy spent after some rounds, from `dp_accounting`'s RDP
accountant: each round is a Poisson-sampled Gaussian mechanism with sampling rate
q = clients per round / clients and noise multiplier z, composed over the rounds, at
`delta` (default 1 / N^1.1 for N clients). The program samples exactly
`clients_per_round` clients without replacement per round, which the Poisson
analysis approximates (as TFF's and TensorFlow Privacy's own tutorials account).

What the guarantee covers: the model updates the server receives. The robust
zeroing layer (on by default) sits outside the DP mean, as in
`tff.learning.dp_aggregator`; its threshold and count are estimated without noise, so
they are not covered: use `--nozeroing` for a guarantee on everything the server
aggregates. The robust clipping layer is replaced by the DP mean's own clipping.
"""

from typing import Any, Optional

import dp_accounting
import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam.federated.learning import aggregation

# RDP orders the accountant evaluates (TensorFlow Privacy's defaults, extended).
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512])


def default_delta(num_clients: int) -> float:
  """delta = 1 / N^1.1: below 1/N, so that leaking one client is not private."""
  return 1.0 / float(num_clients) ** 1.1


def build_dp_factory(*, noise_multiplier: float, clients_per_round: int,
                     clip_norm: float = 0.0, target_quantile: float = 0.5,
                     initial_norm: float = 1.0) -> tff.aggregators.UnweightedAggregationFactory:
  """TFF's DP mean: fixed clipping at `clip_norm` (> 0) or adaptive clipping.

  Args:
    noise_multiplier: z, the Gaussian noise's std in units of the clipping norm.
    clients_per_round: Clients sampled per round (the mean's denominator).
    clip_norm: Fixed L2 clipping norm; 0 = adaptive.
    target_quantile: With adaptive clipping, the quantile of the clients' update
      norms the clipping norm tracks.
    initial_norm: With adaptive clipping, its starting norm.
  """
  dp = tff.aggregators.DifferentiallyPrivateFactory
  if clip_norm > 0:
    return dp.gaussian_fixed(noise_multiplier=noise_multiplier,
                             clients_per_round=float(clients_per_round), clip=clip_norm)
  return dp.gaussian_adaptive(noise_multiplier=noise_multiplier,
                              clients_per_round=float(clients_per_round),
                              initial_l2_norm_clip=initial_norm,
                              target_unclipped_quantile=target_quantile,
                              learning_rate=aggregation.CLIPPING_RATE,
                              clipped_count_stddev=clipped_count_stddev(
                                  noise_multiplier=noise_multiplier,
                                  clients_per_round=clients_per_round))


def clipped_count_stddev(*, noise_multiplier: float, clients_per_round: int) -> float:
  """The noise on adaptive clipping's count of unclipped clients.

  Andrew et al.'s m / 20 for m clients per round, but at least z: TFF splits the
  privacy budget so that the values' noise multiplier becomes
  (z^-2 - (2 sigma_b)^-2)^-1/2, which needs sigma_b > z / 2; at sigma_b = z the values
  get 1.15 z. With few clients per round (m / 20 < z) the count, and so the clipping
  norm, is therefore noisy.
  """
  return max(0.05 * clients_per_round, noise_multiplier)


def epsilon(*, noise_multiplier: float, sampling_rate: float, rounds: int,
            delta: float) -> float:
  """epsilon after `rounds` Poisson-sampled Gaussian rounds (RDP accountant).

  Args:
    noise_multiplier: z.
    sampling_rate: q, the probability a client takes part in a round.
    rounds: Rounds so far (0 gives 0).
    delta: The delta of the (epsilon, delta) guarantee.

  Returns:
    epsilon (inf when the noise is zero).
  """
  if rounds == 0:
    return 0.0
  if noise_multiplier <= 0:
    return float("inf")
  accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
  event = dp_accounting.PoissonSampledDpEvent(
      sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
  accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
  return float(accountant.get_epsilon(delta))


def describe_setup(config: config_lib.RunConfig, *, num_clients: int) -> dict[str, Any]:
  """A run's DP settings as `summary.json` holds them, and a `line` for the log."""
  m = min(config.clients_per_round, num_clients)
  delta = config.dp_delta or default_delta(num_clients)
  clip = config.dp_clip_norm if config.dp_clip_norm > 0 else "adaptive"
  out = {"noise_multiplier": config.dp_noise_multiplier, "clip_norm": clip,
         "target_quantile": config.dp_target_quantile if clip == "adaptive" else None,
         "clients": num_clients, "clients_per_round": m, "sampling_rate": m / num_clients,
         "delta": delta, "accountant": "RDP, Poisson-sampled Gaussian",
         "zeroing_covered": not config.zeroing}
  clipping = (f"fixed clipping at {clip:g}" if clip != "adaptive" else
              f"adaptive clipping (quantile {config.dp_target_quantile:g})")
  out["line"] = (
      f"differential privacy: noise multiplier {config.dp_noise_multiplier:g}, {clipping}, "
      f"{m} of {num_clients} clients per round (q = {m / num_clients:.3g}), delta "
      f"{delta:.3g}; epsilon after {config.rounds} rounds: "
      f"{epsilon(noise_multiplier=config.dp_noise_multiplier, sampling_rate=m / num_clients, rounds=config.rounds, delta=delta):.3g}"
      + ("" if not config.zeroing else "; the robust zeroing layer is not covered "
         "(--nozeroing for a guarantee on everything aggregated)"))
  return out


def epsilon_fn(*, noise_multiplier: float, clients_per_round: int, num_clients: int,
               delta: Optional[float] = None):
  """`rounds -> epsilon` of a run: q = clients_per_round / num_clients."""
  q = min(1.0, clients_per_round / num_clients)
  d = delta or default_delta(num_clients)
  return lambda rounds: epsilon(noise_multiplier=noise_multiplier, sampling_rate=q,
                                rounds=rounds, delta=d)
