"""The synthetic recipe's report: accuracy curves (through ``mmprm_infer.evaluation.best_of_n``), the plot,
the printed summary and a reranking example."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmprm_infer.answers import group_answers
from mmprm_infer.evaluation.best_of_n import BonQuestion, accuracy_curves
from mmprm_infer.prm import ScoringItem
from mmprm_infer.rerank import rerank_batch

__all__ = ["SUMMARY_AGGREGATION", "SUMMARY_NS", "selection_metrics", "Curve", "plot_accuracy", "print_summary",
           "print_accuracy_table", "rerank_example"]

SUMMARY_AGGREGATION = "min"  # the aggregation the summary table and the reranking example use
SUMMARY_NS = (1, 4, 16)


def selection_metrics(cases: list[dict], ns: Sequence[int], aggregations: Sequence[str],
                      vote_aggregation: str = "min") -> dict[str, dict[str, float]]:
    """``accuracy[method][str(N)]`` over ``cases`` (answers, correct, rewards each): the 16 candidates of a
    problem cut into 16 / N disjoint groups of N, each group one pick; votes split ties evenly
    (``best_of_n``'s ``*_tie_split`` methods).  Methods: ``prm_best_of_n/<aggregation>``,
    ``prm_weighted_vote`` (``vote_aggregation`` scores summed per answer), ``majority_vote``, ``random``
    (a uniform pick) and ``pass`` (any right)."""
    questions = [BonQuestion(c["answers"], c["correct"], c["rewards"], group_ids=group_answers(c["answers"]))
                 for c in cases]
    curves = accuracy_curves(questions, list(dict.fromkeys([*aggregations, vote_aggregation])), ns,
                             groups="disjoint", tie_split=True)["accuracy"]
    out = {f"prm_best_of_n/{agg}": curves[f"best_of_n/{agg}"] for agg in aggregations}
    out.update(prm_weighted_vote=curves[f"weighted_vote_tie_split/{vote_aggregation}"],
               majority_vote=curves["majority_tie_split"], random=curves["random"], **{"pass": curves["pass"]})
    return out


class Curve:
    """One line of the plot: ``accuracy[key]`` against N."""

    def __init__(self, accuracy: dict, key: str, label: str, style: str):
        self.values, self.label, self.style = accuracy[key], label, style


def plot_accuracy(curves: Sequence[Curve], title: str, path: Path) -> Path:
    import matplotlib  # heavy, and only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: heavy, loaded where used

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = sorted(int(n) for n in curves[0].values)
    for c in curves:
        ax.plot(ns, [100 * c.values[str(n)] for n in ns], c.style, label=c.label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (candidates per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pipeline_curves(report: dict) -> list[Curve]:
    """The pipeline's plot: pass@N, best-of-N with the best aggregation and with min, the votes, random."""
    acc, best = report["accuracy"], report["best_aggregation"]
    lines = [("pass", "pass@N", "k:"), (f"prm_best_of_n/{best}", f"PRM best-of-N ({best})", "C0-o"),
             ("prm_best_of_n/min", "PRM best-of-N (min)", "C4--"), ("prm_weighted_vote", "PRM-weighted vote", "C1-s"),
             ("majority_vote", "majority vote", "C2-^"), ("random", "random", "C3-x")]
    seen: set[str] = set()
    curves = []
    for key, label, style in lines:
        if key in acc and key not in seen:
            seen.add(key)
            curves.append(Curve(acc, key, label, style))
    return curves


def print_accuracy_table(rows: Sequence[tuple[str, dict]], ns: Sequence[int], width: int = 24) -> None:
    """``rows``: (label, {str(N): accuracy}); percentages at each N."""
    print("accuracy (%)".ljust(width) + "".join(f"N={n}".rjust(8) for n in ns))
    for label, values in rows:
        print(label.ljust(width) + "".join(f"{100 * values[str(n)]:8.1f}" for n in ns))


def summary_ns(accuracy: dict) -> list[int]:
    measured = sorted(int(n) for n in accuracy["random"])
    return [n for n in measured if n in SUMMARY_NS] or measured


def summary_aggregation(report: dict) -> str:
    return SUMMARY_AGGREGATION if f"prm_best_of_n/{SUMMARY_AGGREGATION}" in report["accuracy"] \
        else report["best_aggregation"]


def print_summary(report: dict, run_dir: Path) -> None:
    """The run at a glance: step-error F1, a small accuracy table (PRM best-of-N with ``min``,
    PRM-weighted vote, majority vote, random, pass@N at N = 1, 4, 16 where measured) and where the
    report, the plot and the trained PRM are.  Every aggregation and N is in report.json."""
    s, acc = report["summary"], report["accuracy"]
    agg = summary_aggregation(report)
    print(f"\n=== held-out evaluation: {report['test']['problems']} problems x "
          f"{report['test']['candidates_per_problem']} candidates ({report['model']['inputs']}) ===")
    print(f"step-error (ProcessBench): F1 {s['f1']:.3f} (acc on wrong {s['acc_error']:.3f}, "
          f"acc on right {s['acc_correct']:.3f})")
    print_accuracy_table([(f"PRM best-of-N ({agg})", acc[f"prm_best_of_n/{agg}"]),
                          ("PRM-weighted vote", acc["prm_weighted_vote"]), ("majority vote", acc["majority_vote"]),
                          ("random pick", acc["random"]), ("pass@N (any right)", acc["pass"])], summary_ns(acc))
    print(f"wall time {report['timings_s']['total_s']:.0f} s")
    print(f"report (every aggregation, N = {', '.join(sorted(acc['random'], key=int))}): {run_dir / 'report.json'}")
    print(f"plot: {run_dir / 'accuracy_vs_n.png'}")
    print(f"trained PRM: {run_dir / 'prm'}  (PRM.from_pretrained('{run_dir / 'prm'}'))", flush=True)


def rerank_example(prm, items, problems, aggregate: str = SUMMARY_AGGREGATION, k: int = 8,
                   with_image_text: bool = True) -> dict:
    """Print one held-out question, its first ``k`` candidates with step rewards, and the chosen answer
    (``rerank_batch``); prefers a question whose candidates disagree on the answer."""
    chosen = next((i for i, item in enumerate(items) if len({tuple(c[-1:]) for c in item.candidates[:k]}) >= 2), 0)
    p, full = problems[chosen], items[chosen]
    item = ScoringItem(full.question, full.candidates[:k], full.image)
    res = rerank_batch([item], prm, aggregate=aggregate, strategy="best_of_n")[0]
    maj = rerank_batch([item], None, strategy="majority_vote")[0]
    print("=== reranking example (a held-out problem; the PRM sees the picture"
          f"{' and its text rendering' if with_image_text else ''}) ===")
    print(item.question)
    print(f"(reference answer {p.answer}; the picture: {'a 3x3 table' if p.kind == 'grid' else 'a bar chart'})\n")
    # a PRM ranked them: step_rewards and scores are set
    shown = zip(item.candidates, res.step_rewards, res.scores, res.answers)  # type: ignore[arg-type]
    for i, (steps, rw, score, ans) in enumerate(shown):
        print(f"Candidate {i}: answer {ans} ({'right' if ans == p.answer else 'WRONG'}), score ({aggregate}) "
              f"{score:.3f}")
        for s, r in zip(steps, rw):
            print(f"    {r:.3f}  {s}")
    print(f"\nPRM best-of-{len(item.candidates)} ({aggregate}) chose candidate {res.best_index}: answer "
          f"{res.answers[res.best_index]} ({'right' if res.answers[res.best_index] == p.answer else 'wrong'}); "
          f"majority vote: {maj.answers[maj.best_index]}; reference {p.answer}", flush=True)
    return res.to_dict()
