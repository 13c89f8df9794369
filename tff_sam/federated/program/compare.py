"""Does federated fine-tuning pay? Zero-shot vs local-only vs centralized vs federated.

`plan_arms` turns one run's settings into the runs of a comparison, for each seed:

* `zero_shot`: the program with `rounds=0` (the pretrained model, evaluated);
* `local/<site>`: each training site alone (`train_clients=(site,)`), for as many
  rounds as the federated run samples that site, so it takes the same number of
  local optimizer steps as that site does in the federated run;
* `centralized`: every training image in one client (`pool_clients`), for the
  rounds that make its steps (closest to) the federated run's total steps;
* `federated`: the settings as given;
* `fed_lora`: the same with LoRA adapters in the image encoder (`--adapter=lora`),
  trained and sent with the decoder (only when the settings have no adapter: with
  one, `federated` already is that run);
* optionally `without/<site>` (leave one site out): federated training on the other
  sites, evaluated on every held-out client, the left-out site's included.

`arms` chooses among `ARM_KINDS` (default all).

The zero-shot, local-only and centralized arms have no server, so they run without
the settings of how updates reach it (`config.UPLOAD_SETTINGS`: differential
privacy, secure aggregation, compression); the federated arms keep them.

Every arm is a real run of the program (`program.run_experiment`) in its own folder,
with its own zero-shot round, training and evaluation; nothing is copied between arms,
and a re-run resumes or skips the arms already done. Every arm is scored on the same
held-out images, by its exported model on each evaluation prompt
(`summary.json["evaluation"]`). `summarize` gives mean ± std over seeds per evaluation
client, the local-only mean over sites, and the gains of federated training over
zero-shot, local-only and centralized, and of `fed_lora` over zero-shot and
`federated`, paired by seed.
"""

import dataclasses
import math
from pathlib import Path
import resource
from typing import Callable, Optional, Sequence

import numpy as np

from tff_sam import config as config_lib
from tff_sam import fileio
from tff_sam import output_folder
from tff_sam.data import discovery
from tff_sam.evaluation import plots
from tff_sam.federated.program import personalization
from tff_sam.federated.program import program
from tff_sam.federated.program import run_data

ZERO_SHOT = "zero_shot"
LOCAL = "local"
LOCAL_MEAN = "local_only"
CENTRALIZED = "centralized"
FEDERATED = "federated"
FED_LORA = "fed_lora"
WITHOUT = "without"
# The federated arm's sites after `--personalize_steps` local steps each (a row of the
# "own site" view, computed by the federated run itself).
PERSONALIZED = "personalized"
# The own-site view's gains: (arm, other row).
OWN_SITE_GAINS = ((FEDERATED, LOCAL_MEAN), (PERSONALIZED, LOCAL_MEAN), (PERSONALIZED, FEDERATED),
                  (FEDERATED, CENTRALIZED), (PERSONALIZED, CENTRALIZED))
# The arms `plan_arms` can make (`local` stands for every `local/<site>`).
ARM_KINDS = config_lib.COMPARE_ARMS  # (ZERO_SHOT, LOCAL, CENTRALIZED, FEDERATED, FED_LORA)
LORA_SETTINGS = config_lib.LORA_SETTINGS  # What `plan_arms(lora=...)` may set.
METRICS = ("dice", "iou", "msa", "sa50")
LABELS = {"dice": "Dice", "msa": "mSA"}  # Of the per-client columns.
COMPARE_FILE = "compare.json"
TABLE_FILE = "compare.md"
PLOT_FILE = "compare.png"
LABELS_PLOT_FILE = "compare_labels.png"


@dataclasses.dataclass(frozen=True)
class Arm:
  """One run of a comparison.

  Attributes:
    name: `zero_shot`, `local/<site>`, `centralized`, `federated`, `fed_lora` or
      `without/<site>`.
    seed: Its seed.
    config: The run's settings (its `output_dir` is the arm's folder).
    steps: Planned local optimizer steps per training client of the run.
  """

  name: str
  seed: int
  config: config_lib.RunConfig
  steps: dict

  @property
  def kind(self) -> str:
    return self.name.split("/", 1)[0]


def _steps(images: int, config: config_lib.RunConfig) -> int:
  return config.local_epochs * -(-images // config.batch_size)


def plan_arms(base: config_lib.RunConfig, *, splits: discovery.DatasetSplits, seeds: int,
              root: Path, leave_one_site_out: bool = False,
              arms: Sequence[str] = ARM_KINDS, lora: Optional[dict] = None) -> list[Arm]:
  """The runs of a comparison of `base`'s settings (module docstring).

  Args:
    base: The federated run's settings (`train_clients`/`pool_clients` unset).
    splits: The data as `base` splits it (`run_data.prepare_data`).
    seeds: Seeds `base.seed`, `base.seed + 1`, ...
    root: Folder of the arms (`root/seed<k>/<arm>`).
    leave_one_site_out: Add the `without/<site>` arms.
    arms: Which of `ARM_KINDS` to run.
    lora: `LORA_SETTINGS` of the `fed_lora` arm (the others keep the defaults).

  Returns:
    The arms, seed by seed.

  Raises:
    ValueError: `arms` names an unknown arm.
    errors.ConfigError: `lora` holds a bad setting (naming its flag).
  """
  unknown = sorted(set(arms) - set(ARM_KINDS))
  if unknown:
    raise ValueError(f"unknown arms {unknown}; known: {ARM_KINDS}")
  kinds = set(arms)
  if base.adapter != config_lib.NO_ADAPTER:
    kinds.discard(FED_LORA)  # `federated` already has the adapters.
  images = {c: len(exs) for c, exs in splits.clients.items() if exs}
  sites = sorted(images)
  # Arms without a server train and upload nothing privately: plain settings.
  defaults = {f.name: f.default for f in dataclasses.fields(config_lib.RunConfig)}
  serverless = {name: defaults[name] for name in config_lib.UPLOAD_SETTINGS}
  # Only the federated arm personalizes (the `personalized` row).
  unpersonalized = {name: defaults[name] for name in ("personalize_steps", "site_test_clients")}
  planned = []
  for seed in range(base.seed, base.seed + seeds):
    def arm(name, server=True, **changes):
      config = dataclasses.replace(
          base, **({} if server else serverless),
          **({} if name == FEDERATED else unpersonalized), seed=seed,
          output_dir=str(root / f"seed{seed}" / name.replace("/", "_")), **changes).validate()
      sampled = {c: 0 for c in (config.train_clients or sites)}
      if config.pool_clients:
        steps = {discovery.POOLED_CLIENT: config.rounds * _steps(
            sum(images[c] for c in sampled), config)}
      else:
        for r in range(1, config.rounds + 1):
          for c in program.sample_clients(sorted(sampled), round_num=r,
                                          clients_per_round=config.clients_per_round,
                                          seed=seed):
            sampled[c] += 1
        steps = {c: n * _steps(images[c], config) for c, n in sampled.items()}
      return Arm(name=name, seed=seed, config=config, steps=steps)

    federated = arm(FEDERATED)
    if ZERO_SHOT in kinds:
      planned.append(arm(ZERO_SHOT, server=False, rounds=0))
    for site in sites if LOCAL in kinds else ():
      rounds = federated.steps[site] // _steps(images[site], base)
      planned.append(arm(f"{LOCAL}/{site}", server=False, train_clients=(site,),
                         clients_per_round=1, rounds=rounds))
    if CENTRALIZED in kinds:
      total = sum(federated.steps.values())
      per_round = _steps(sum(images.values()), base)
      planned.append(arm(CENTRALIZED, server=False, pool_clients=True, clients_per_round=1,
                         rounds=max(1, round(total / per_round))))
    if FEDERATED in kinds:
      planned.append(federated)
    if FED_LORA in kinds:
      planned.append(arm(FED_LORA, adapter=config_lib.LORA_ADAPTER, **(lora or {})))
    if leave_one_site_out and len(sites) > 1:
      for site in sites:
        others = tuple(c for c in sites if c != site)
        planned.append(arm(f"{WITHOUT}/{site}", train_clients=others,
                           clients_per_round=min(base.clients_per_round, len(others))))
  return planned


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_arms(arms: Sequence[Arm], *, fresh: bool = False,
             log: Callable[[str], None] = print,
             memory: Optional[list[dict]] = None) -> list[dict]:
  """Runs (or resumes, or skips when complete) every arm; returns their summaries.

  Every arm runs in this process, one after another (each releases its computations
  when it ends). `memory`, if given, gets the process's peak RSS after each arm.
  """
  summaries = []
  for i, arm in enumerate(arms, start=1):
    prefix = f"[{i}/{len(arms)} seed {arm.seed} {arm.name}]"
    log(f"{prefix} {arm.config.rounds} rounds -> {arm.config.output_dir}")
    summaries.append(program.run_experiment(arm.config, fresh=fresh,
                                            log=lambda line, p=prefix: log(f"{p} {line}")))
    peak = peak_rss_bytes()
    log(f"{prefix} done; this process's peak memory so far {peak / 2**30:.2f} GiB")
    if memory is not None:
      memory.append({"arm": arm.name, "seed": arm.seed, "peak_rss_bytes": peak})
  return summaries


def _stats(values: Sequence[float]) -> dict:
  values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
  if not values:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(np.mean(values)),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def _scores(summary: dict, prompt: str) -> dict:
  """Metric -> {"all": value, "<client>": value} of one arm on one evaluation prompt."""
  result = summary["evaluation"]["by_prompt"][prompt]
  return {m: {"all": result[m], **{c: v[m] for c, v in result["by_client"].items()}}
          for m in METRICS}


def _gains(per_seed: dict, pairs: Sequence[tuple[str, str]]) -> dict:
  """`<arm>-<other>` -> metric -> column -> stats over seeds of the paired differences."""
  gains = {}
  for arm_name, other in pairs:
    if arm_name not in per_seed or other not in per_seed:
      continue
    mine, theirs = per_seed[arm_name], per_seed[other]
    seeds = sorted(s for s in mine if s in theirs)
    if not seeds:
      continue
    gains[f"{arm_name}-{other}"] = {
        m: {c: _stats([mine[s][m][c] - theirs[s][m][c] for s in seeds
                       if mine[s][m][c] is not None and theirs[s][m][c] is not None])
            for c in mine[seeds[0]][m]} for m in METRICS}
  return gains


def _own_site(per_seed: dict, summaries: dict, *, prompt: str,
              site_clients: dict[str, str]) -> dict:
  """The own-site view of one prompt: each site's model scored on its own held-out
  client (`site_clients`), rows arm -> metric -> "all" (mean over sites) / site -> stats.

  `local_only` is each site's own `local/<site>` model there; `personalized` each
  site's personalized copy of the federated model (`summaries`: seed -> the federated
  arm's summary); the other rows are one model scored on every site's client.
  """
  own: dict[str, dict[int, dict]] = {}
  for name in (ZERO_SHOT, CENTRALIZED, FEDERATED, FED_LORA):
    for seed, scores in per_seed.get(name, {}).items():
      own.setdefault(name, {})[seed] = {
          m: {site: scores[m][c] for site, c in site_clients.items()} for m in METRICS}
  for seed in sorted({s for n, runs in per_seed.items() if n.startswith(LOCAL + "/")
                      for s in runs}):
    if all(seed in per_seed.get(f"{LOCAL}/{site}", {}) for site in site_clients):
      own.setdefault(LOCAL_MEAN, {})[seed] = {
          m: {site: per_seed[f"{LOCAL}/{site}"][seed][m][c] for site, c in site_clients.items()}
          for m in METRICS}
  for seed, summary in summaries.items():
    sites = summary.get("personalized", {}).get("sites", {})
    if sites:
      own.setdefault(PERSONALIZED, {})[seed] = {m: {
          site: (sites[site]["by_prompt"][prompt]["personalized"][m] if site in sites else None)
          for site in site_clients} for m in METRICS}
  for runs in own.values():
    for scores in runs.values():
      for m in METRICS:
        values = [v for v in scores[m].values() if v is not None]
        scores[m] = {"all": float(np.mean(values)) if values else None, **scores[m]}
  order = (ZERO_SHOT, LOCAL_MEAN, CENTRALIZED, FEDERATED, PERSONALIZED, FED_LORA)
  rows = {name: {m: {c: _stats([own[name][s][m][c] for s in own[name]])
                     for c in ("all", *site_clients)} for m in METRICS}
          for name in order if name in own}
  return {"sites": dict(site_clients), "rows": rows, "gains": _gains(own, OWN_SITE_GAINS)}


def summarize(arms: Sequence[Arm], summaries: Sequence[dict], *,
              eval_prompt: Sequence[str], site_clients: Optional[dict[str, str]] = None
              ) -> dict:
  """Per evaluation prompt: rows (arm -> metric -> client -> stats over seeds) and gains,
  and with `site_clients` (site -> its own held-out client) the own-site view
  (`own_site`, see `_own_site`).

  The `local_only` row is, per seed, the mean over the `local/<site>` arms; gains are
  federated minus the other row, per seed, then mean ± std over seeds.
  """
  seeds = sorted({a.seed for a in arms})
  out = {}
  for prompt in eval_prompt:
    per_seed: dict[str, dict[int, dict]] = {}
    for arm, summary in zip(arms, summaries, strict=True):
      per_seed.setdefault(arm.name, {})[arm.seed] = _scores(summary, prompt)
    locals_ = [n for n in per_seed if n.startswith(LOCAL + "/")]
    if locals_:
      per_seed[LOCAL_MEAN] = {
          s: {m: {c: float(np.mean([per_seed[n][s][m][c] for n in locals_]))
                  for c in per_seed[locals_[0]][s][m]} for m in METRICS} for s in seeds}
    order = ([ZERO_SHOT, LOCAL_MEAN] + sorted(locals_) + [CENTRALIZED, FEDERATED, FED_LORA]
             + sorted(n for n in per_seed if n.startswith(WITHOUT + "/")))
    rows = {}
    for name in (n for n in order if n in per_seed):
      runs = per_seed[name]
      first = next(iter(runs.values()))
      rows[name] = {m: {c: _stats([runs[s][m][c] for s in runs]) for c in first[m]}
                    for m in METRICS}
    gains = _gains(per_seed, [(FEDERATED, ZERO_SHOT), (FEDERATED, LOCAL_MEAN),
                              (FEDERATED, CENTRALIZED), (FED_LORA, ZERO_SHOT),
                              (FED_LORA, FEDERATED)])
    out[prompt] = {"rows": rows, "gains": gains}
    if site_clients:
      federated = {a.seed: s for a, s in zip(arms, summaries) if a.name == FEDERATED}
      out[prompt]["own_site"] = _own_site(per_seed, federated, prompt=prompt,
                                          site_clients=site_clients)
  return out


def _cell(stats: dict, scale: float = 100.0) -> str:
  if stats["mean"] is None:
    return "-"
  if stats["n"] > 1:
    return f"{stats['mean'] * scale:.1f} ± {stats['std'] * scale:.1f}"
  return f"{stats['mean'] * scale:.1f}"


def markdown_table(table: dict, *, steps: dict, seeds: int) -> str:
  """The comparison as markdown: one table per evaluation prompt (values x 100).

  Args:
    table: `summarize`'s result.
    steps: Arm name -> total planned local steps (first seed).
    seeds: Number of seeds (mean ± std over them when > 1).
  """
  lines = []
  for prompt, part in table.items():
    rows, key = part["rows"], config_lib.headline_metric(prompt)
    clients = [c for c in next(iter(rows.values()))[key] if c != "all"]
    head = (["arm", "Dice", "IoU", "mSA", "SA50"] + [f"{LABELS[key]} {c}" for c in clients]
            + ["local steps"])
    lines += [f"**{plots.prompt_title(prompt)}** (held-out; x100; "
              + (f"mean ± std over {seeds} seeds)" if seeds > 1 else "1 seed)"), "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
      cells = ([name] + [_cell(r[m]["all"]) for m in METRICS]
               + [_cell(r[key][c]) for c in clients] + [str(steps.get(name, "-"))])
      lines.append("| " + " | ".join(cells) + " |")
    for name, g in part["gains"].items():
      lines.append(f"| gain {name} | " + " | ".join(_cell(g[m]["all"]) for m in METRICS)
                   + " | " + " | ".join(_cell(g[key][c]) for c in clients) + " | |")
    lines.append("")
    if part.get("own_site", {}).get("rows"):
      lines += _own_site_table(prompt, part["own_site"], seeds=seeds)
  return "\n".join(lines)


def _own_site_table(prompt: str, own: dict, *, seeds: int) -> list[str]:
  """The own-site view as markdown lines (`summarize`'s `own_site`)."""
  sites, key = list(own["sites"]), config_lib.headline_metric(prompt)
  head = ["arm", "Dice", "IoU", "mSA", "SA50"] + [
      f"{LABELS[key]} {s} (on {c})" for s, c in own["sites"].items()]
  spread = f"mean ± std over {seeds} seeds)" if seeds > 1 else "1 seed)"
  lines = [f"**{plots.prompt_title(prompt)}, each site on its own held-out client** "
           f"(x100; mean over sites, {spread}", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in own["rows"].items():
    lines.append("| " + " | ".join([name] + [_cell(r[m]["all"]) for m in METRICS]
                                   + [_cell(r[key][s]) for s in sites]) + " |")
  for name, g in own["gains"].items():
    lines.append(f"| gain {name} | " + " | ".join(
        [_cell(g[m]["all"]) for m in METRICS] + [_cell(g[key][s]) for s in sites]) + " |")
  return lines + [""]


def write_outputs(root: Path, *, base: config_lib.RunConfig, arms: Sequence[Arm],
                  summaries: Sequence[dict], seeds: int, leave_one_site_out: bool,
                  memory: Sequence[dict] = (),
                  site_clients: Optional[dict[str, str]] = None,
                  label_levels: Optional[dict] = None) -> dict:
  """Writes `compare.json`, `compare.md` and `compare.png` into `root`; returns the JSON.

  `memory`: the process's peak RSS after each arm (`run_arms`), kept in the JSON.
  `site_clients`: site -> its own held-out client, for the own-site view.
  `label_levels`: with more than one label count (`label_curve`'s `levels`), the
  label curve too: `label_curve` in the JSON, its table and `compare_labels.png`, and
  every count's arms with their results (`label_arms`: count or "all" -> arms).
  """
  prompts = base.eval_prompt_list
  table = summarize(arms, summaries, eval_prompt=prompts, site_clients=site_clients)
  result = {
      "config": base.to_dict(), "seeds": sorted({a.seed for a in arms}),
      "leave_one_site_out": leave_one_site_out, "eval_prompt": list(prompts),
      "arms": [_arm_record(a, s, prompts) for a, s in zip(arms, summaries, strict=True)],
      "table": table,
      "memory": list(memory),
  }
  if seeds != len(result["seeds"]):
    raise ValueError(f"{seeds} seeds planned, the arms have {result['seeds']}")
  if label_levels and len(label_levels) > 1:
    curve = label_curve(label_levels, prompts=prompts, site_clients=site_clients)
    result.update(label_curve=curve, label_curve_view="own_site" if site_clients else "all",
                  label_arms={str(count or "all"): [
                      _arm_record(a, s, prompts) for a, s in zip(*level, strict=True)]
                      for count, level in label_levels.items()})
    plots.plot_label_curve(curve, root / LABELS_PLOT_FILE, subtitle=(
        "each site on its own held-out client" if site_clients else "all held-out clients")
        + f"; {seeds} seed(s)")
  fileio.write_json(root / COMPARE_FILE, result)
  fileio.write_text(root / TABLE_FILE, markdown_of(result))
  plots.plot_comparison(table, root / PLOT_FILE)
  return result


def markdown_of(result: dict) -> str:
  """`compare.md` from the contents of `compare.json` (so README's tables can be
  checked against a committed comparison): the tables, and the label curve's."""
  first = min(result["seeds"])
  steps = {a["name"]: sum(a["planned_steps"].values()) for a in result["arms"]
           if a["seed"] == first}
  markdown = markdown_table(result["table"], steps=steps, seeds=len(result["seeds"]))
  if "label_curve" in result:
    counts = sorted({c for rows in result["label_curve"].values() for r in rows.values()
                     for c in r}, key=lambda c: math.inf if c == "all" else int(c))
    markdown += "\n" + _label_curve_table(result["label_curve"], counts=counts,
                                           seeds=len(result["seeds"]),
                                           own_site=result["label_curve_view"] == "own_site")
  return markdown.rstrip("\n") + "\n"


def _arm_record(arm: Arm, summary: dict, prompts: Sequence[str]) -> dict:
  """An arm's entry in `compare.json`: what ran, and its results per prompt and client."""
  return {"name": arm.name, "seed": arm.seed, "output_dir": arm.config.output_dir,
          "rounds": arm.config.rounds, "planned_steps": arm.steps,
          "wall_time_s": summary.get("wall_time_s"),
          "model_round": summary["evaluation"]["model_round"],
          "results": {p: summary["evaluation"]["by_prompt"][p] for p in prompts},
          **_personalized_results(summary, prompts)}


def _personalized_results(summary: dict, prompts: Sequence[str]) -> dict:
  """`{"personalized": site -> prompt -> scores}` of a personalized arm, else `{}`."""
  sites = summary.get("personalized", {}).get("sites", {})
  return {"personalized": {site: {p: r["by_prompt"][p]["personalized"] for p in prompts}
                           for site, r in sites.items()}} if sites else {}


def label_curve(levels: dict[int, tuple[Sequence[Arm], Sequence[dict]]], *,
                prompts: Sequence[str], site_clients: Optional[dict[str, str]]) -> dict:
  """Prompt -> row -> label count ("all" for 0) -> Dice stats over seeds ("all" column;
  mSA for `automatic`).

  Each site's model on its own held-out client (the own-site view, with `personalized`)
  when sites are matched to clients, else every held-out client.
  """
  curve: dict[str, dict] = {p: {} for p in prompts}
  for count, (arms, summaries) in levels.items():
    table = summarize(arms, summaries, eval_prompt=prompts, site_clients=site_clients)
    for prompt in prompts:
      rows = table[prompt].get("own_site", table[prompt])["rows"]
      for name in (ZERO_SHOT, LOCAL_MEAN, CENTRALIZED, FEDERATED, PERSONALIZED):
        if name in rows:
          curve[prompt].setdefault(name, {})[str(count or "all")] = rows[name][
              config_lib.headline_metric(prompt)]["all"]
  return curve


def _label_curve_table(curve: dict, *, counts: Sequence[str], seeds: int,
                       own_site: bool) -> str:
  """The label curve as markdown: per prompt, rows by arm, a column per label count."""
  lines = []
  for prompt, rows in curve.items():
    lines += [f"**{plots.prompt_title(prompt)}: {LABELS[config_lib.headline_metric(prompt)]} "
              "by labelled training images per site** (x100; "
              + ("each site on its own held-out client" if own_site else "all held-out "
                 "clients") + (f"; mean ± std over {seeds} seeds)" if seeds > 1 else ")"), "",
              "| arm | " + " | ".join(counts) + " |", "|" + "---|" * (len(counts) + 1)]
    for name, by_count in rows.items():
      lines.append(f"| {name} | " + " | ".join(
          _cell(by_count[c]) if c in by_count else "-" for c in counts) + " |")
    lines.append("")
  return "\n".join(lines)


def run_comparison(base: config_lib.RunConfig, *, seeds: int = 1,
                   leave_one_site_out: bool = False, root: Optional[Path] = None,
                   arms: Sequence[str] = ARM_KINDS, lora: Optional[dict] = None,
                   labels: Sequence[int] = (0,), fresh: bool = False,
                   log: Callable[[str], None] = print) -> dict:
  """Plans, runs and summarizes a comparison; what `experiments.compare` does.

  Args:
    base: The federated run's settings; its `output_dir` is the comparison's folder
      unless `root` is given.
    seeds: Seeds per arm.
    leave_one_site_out: Also run the leave-one-site-out arms.
    root: Folder of the arms and the outputs.
    arms: Which of `ARM_KINDS` to run.
    lora: The `fed_lora` arm's adapter settings (`plan_arms`).
    labels: Labelled training images per site of each comparison (0 = all): with
      several, the arms run at each count (`labels<N>/`; zero-shot once) and the
      label curve is drawn (`label_curve`); the tables are those of the largest.
    fresh: Redo every arm.
    log: Where progress lines go.

  Returns:
    The contents of `compare.json`.

  Raises:
    errors.UserError: Bad data or settings (one line), as the program raises them;
      `root` cannot be written or another command holds it.
  """
  base.validate()
  with output_folder.claim(root or base.output_dir) as root:
    return _run_comparison(base, root=root, seeds=seeds, leave_one_site_out=leave_one_site_out,
                           arms=arms, lora=lora, labels=labels, fresh=fresh, log=log)


def _plan_levels(base: config_lib.RunConfig, *, root: Path, seeds: int, labels: Sequence[int],
                 cache_root: Path, arms: Sequence[str], leave_one_site_out: bool,
                 lora: Optional[dict]) -> dict[int, list[Arm]]:
  """Label count -> its arms (`plan_arms`), the largest count first (0 = all images,
  in `root` itself; the others in `root/labels<N>/`); zero-shot with the first only."""
  levels = {}
  for i, count in enumerate(sorted(labels, key=lambda n: -(n or math.inf))):
    config = dataclasses.replace(base, labels_per_site=count)
    levels[count] = plan_arms(
        config, splits=run_data.prepare_data(config, cache_root), seeds=seeds,
        root=root / f"labels{count}" if count else root, leave_one_site_out=leave_one_site_out,
        arms=arms if i == 0 else tuple(a for a in arms if a != ZERO_SHOT), lora=lora)
  return levels


def _run_comparison(base: config_lib.RunConfig, *, root: Path, seeds: int,
                    leave_one_site_out: bool, arms: Sequence[str], lora: Optional[dict],
                    labels: Sequence[int], fresh: bool, log: Callable[[str], None]) -> dict:
  """`run_comparison` in its claimed folder `root`."""
  cache_root = Path(base.cache_dir).expanduser() if base.cache_dir else fileio.default_cache_dir()
  splits = run_data.prepare_data(base, cache_root)
  levels = _plan_levels(base, root=root, seeds=seeds, labels=labels, cache_root=cache_root,
                        arms=arms, leave_one_site_out=leave_one_site_out, lora=lora)
  planned = [a for level in levels.values() for a in level]
  log(f"compare: {len(planned)} runs ({seeds} seed(s): "
      f"{', '.join(a.name for a in planned if a.seed == base.seed)}) in {root}")
  site_clients = personalization.site_test_clients(
      base, sites=sorted(c for c, exs in splits.clients.items() if exs),
      test_clients=sorted(splits.test_clients))
  memory: list[dict] = []
  summaries = run_arms(planned, fresh=fresh, log=log, memory=memory)
  by_arm = dict(zip((id(a) for a in planned), summaries))
  zero = [a for a in planned if a.name == ZERO_SHOT]
  per_level = {count: ([*zero, *(a for a in arms_ if a.name != ZERO_SHOT)])
               for count, arms_ in levels.items()}
  main = per_level[next(iter(levels))]
  result = write_outputs(
      root, base=base, arms=main, summaries=[by_arm[id(a)] for a in main], seeds=seeds,
      leave_one_site_out=leave_one_site_out, memory=memory, site_clients=site_clients,
      label_levels={count: (arms_, [by_arm[id(a)] for a in arms_])
                    for count, arms_ in per_level.items()})
  log((root / TABLE_FILE).read_text().rstrip("\n"))  # The table `write_outputs` wrote.
  log(f"outputs in {root}: {COMPARE_FILE}, {TABLE_FILE}, {PLOT_FILE}"
      + (f", {LABELS_PLOT_FILE}" if len(levels) > 1 else ""))
  return result
