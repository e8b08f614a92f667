"""Training health: sample statistics against the data's, alarm flags in the metrics, warnings in the log.

Peers' top complaints about DMD/VSD training are failures the losses do not show: samples that collapse to
one video per prompt, static video, over-saturated colours and a drifting latent mean. Each step compares
the student's samples with the real batch it trained on (device side, inside the jit) and raises a 0/1
flag per failure; the loop averages the flags over its log window (the fraction of steps alarmed) and
`warn_on_alarms` logs a line when that fraction reaches config.health.warn_fraction.

    alarm_collapse    sample diversity across the batch, or within groups of rows sharing a caption
                      (distill.repeat_captions = K > 1), below collapse_fraction x the data's diversity
    alarm_static      sample motion below static_fraction x the data's motion
    alarm_saturation  the samples' fraction beyond saturation_sigmas data standard deviations (per channel)
                      exceeds the data's own fraction by more than saturation_excess
    alarm_mean_drift  some channel's sample mean is more than mean_drift_sigmas data stds from the data's

The within-prompt reference is the data's diversity across the batch: the rows of a group repeat one
clip, so the data have no within-group spread to compare with.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp

from dollar_jax.train.statistics import channel_moments, mean_drift, sample_statistics, saturation

log = logging.getLogger(__name__)

ALARMS = ("alarm_collapse", "alarm_static", "alarm_saturation", "alarm_mean_drift")
_WHY = {
    "alarm_collapse": "samples are collapsing (diversity {sample_diversity:.4g}, within prompt "
                      "{sample_diversity_within:.4g}; data {data_diversity:.4g})",
    "alarm_static": "samples are static (motion {sample_motion:.4g}; data {data_motion:.4g})",
    "alarm_saturation": "samples are saturating ({sample_saturation:.4g} of values beyond the data's range; "
                        "data {data_saturation:.4g})",
    "alarm_mean_drift": "the sample mean is drifting ({sample_mean_drift:.4g} data stds in the worst channel)",
}


def health_metrics(samples, data, health, group_size: int = 1) -> dict:
    """Statistics of the student's samples and of the real batch, and the four alarm flags (0./1.).

    `health` is config.health; `group_size` is distill.repeat_captions. Pure jnp: call inside the step."""
    stats = {**sample_statistics(samples, "sample", group_size), **sample_statistics(data, "data")}
    mean, std = channel_moments(data)
    stats["sample_saturation"] = saturation(samples, mean, std, health.saturation_sigmas)
    stats["data_saturation"] = saturation(data, mean, std, health.saturation_sigmas)
    stats["sample_mean_drift"] = mean_drift(samples, mean, std)
    return stats | alarm_flags(stats, health)


def alarm_flags(stats: dict, health) -> dict:
    """The alarm flags from `health_metrics`' statistics (jnp or NumPy scalars)."""
    floor = health.collapse_fraction * stats["data_diversity"]
    collapse = stats["sample_diversity"] < floor
    if "sample_diversity_within" in stats:
        collapse = collapse | (stats["sample_diversity_within"] < floor)
    flags = {
        "alarm_collapse": collapse,
        "alarm_static": stats["sample_motion"] < health.static_fraction * stats["data_motion"],
        "alarm_saturation": stats["sample_saturation"] > stats["data_saturation"] + health.saturation_excess,
        "alarm_mean_drift": stats["sample_mean_drift"] > health.mean_drift_sigmas,
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in flags.items()}


def warn_on_alarms(step: int, means: dict, health, logger: logging.Logger = log) -> list[str]:
    """Log one warning per alarm raised on at least health.warn_fraction of the logged window's steps;
    returns the alarms warned about. `means` are the window averages the loop writes."""
    raised = [a for a in ALARMS if means.get(a, 0.0) >= health.warn_fraction]
    for alarm in raised:
        logger.warning("step %d: %s: %s (on %.0f%% of the last steps; thresholds in config.health)", step, alarm,
                       _WHY[alarm].format_map(_Missing(means)), 100 * means[alarm])
    return raised


class _Missing(dict):
    """Format values absent from a window (e.g. within-prompt diversity without repeated captions) as nan."""

    def __missing__(self, key):
        return float("nan")
