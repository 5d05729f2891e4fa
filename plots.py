"""What a run leaves to look at, drawn with matplotlib from its files:

    run_dir/trees.jsonl   the last step's trees (rank 0's), one JSON line per tree, a
                          row per node (to_record): parent, depth, round, tokens,
                          text, V, J (Eq. MC), A_GL, A_IB, A, R; from_record reads it
    run_dir/trees.txt     the most telling trees as text, one line per step
    run_dir/trees.png     the most telling tree: steps by depth, coloured by V
    run_dir/metrics.png   reward, Eff-Rate, IB-Score and the eval sets over steps

    python plots.py RUN_DIR [--tree N]   # redraw both pictures (N: a line of trees.jsonl)

"Most telling": mixed leaf rewards first (where every leaf is right, every J's
exploitation term and every A_GL is 0), then more branch points, then more leaves.
Equation names: METHOD.md.
"""
import argparse
import json
import os

import ib_score
import tree as tree_mod
from checkpoint import read_metrics


def to_record(tree, tokenizer, cfg) -> dict:
    """One tree.Tree (values and advantages computed) as JSON (a line of trees.jsonl): question, gold, prompt ids, and per
    node, the root first and depth-first, its parent's index, depth, round, token
    ids and count, rollout log-probs, text, V, J (Eq. MC, at nodes with children),
    A_GL, A_IB, A, and R at leaves."""
    nodes = tree.nodes()
    index = {n: i for i, n in enumerate(nodes)}
    rows = [{"id": index[n], "parent": index.get(n.parent), "depth": n.depth, "round": n.round,
             "tokens": len(n.ids), "ids": n.ids, "logps": n.logps,
             "text": tokenizer.decode(n.ids, skip_special_tokens=True), "V": n.V,
             "J": ib_score.monte_carlo(*tree_mod.mc_args(n, cfg)) if n.children else None,
             "A_GL": n.A_GL, "A_IB": n.A_IB, "A": n.A, "R": n.reward if n.terminal else None,
             "terminal": n.terminal} for n in nodes]
    return {"question": tokenizer.decode(tree.prompt_ids, skip_special_tokens=True), "answer": tree.answer,
            "prompt_ids": tree.prompt_ids, "nodes": rows}


def from_record(record: dict):
    """The Tree of a to_record() line, values and advantages included."""
    tree = tree_mod.Tree(list(record["prompt_ids"]), record["answer"])
    nodes = []
    for row in record["nodes"]:  # parents come before their children
        if row["parent"] is None:
            n = tree.root
        else:
            n = nodes[row["parent"]].add_child(row["ids"], row["logps"], row["terminal"], row["round"])
        n.V, n.A_GL, n.A_IB, n.A, n.reward = row["V"], row["A_GL"], row["A_IB"], row["A"], row["R"]
        nodes.append(n)
    return tree


def most_telling(records: list[dict]) -> list[int]:
    """Indices of `records` (to_record), the ones that show a decision first."""
    def key(i):
        nodes = records[i]["nodes"]
        parents = [n["parent"] for n in nodes if n["parent"] is not None]
        rewards = {n["R"] for n in nodes if n["terminal"]}
        return len(rewards) > 1, sum(parents.count(p) >= 2 for p in set(parents)), len(parents)
    return sorted(range(len(records)), key=lambda i: (key(i), -i), reverse=True)


def dump(record: dict, width: int = 48) -> str:
    """A tree as text: one line per step (depth-first), with depth, V, J at branch
    points, A and the round that sampled it, R at leaves, the start of its text."""
    lines = [f"question: {record['question'][-width:]!r}  gold: {record['answer']!r}"]
    for n in record["nodes"]:
        j = f" J={n['J']:+.3f}" if n["J"] is not None else ""
        a = f" A={n['A']:+.3f} r{n['round']}" if n["parent"] is not None else ""
        r = f" R={n['R']:g}" if n["terminal"] else ""
        text = n["text"] if n["parent"] is not None else "<root>"
        lines.append(f"{'  ' * n['depth']}[{n['depth']}] V={n['V']:.2f}{j}{a}{r} {text[:width]!r}")
    return "\n".join(lines)


def write_trees(run_dir: str, records: list[dict], n_text: int = 1) -> None:
    """trees.jsonl (all), trees.txt (the n_text most telling) and trees.png (the first of them)."""
    with open(os.path.join(run_dir, "trees.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    order = most_telling(records)
    if n_text:
        with open(os.path.join(run_dir, "trees.txt"), "w") as f:
            f.write("\n\n".join(dump(records[i]) for i in order[:n_text]) + "\n")
    if records:
        draw_tree(records[order[0]], os.path.join(run_dir, "trees.png"))


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:  # matplotlib is optional outside the toy world: no picture
        return None


def draw_tree(record: dict, path: str) -> str | None:
    """One tree: x = depth, leaves one row each in depth-first order, a parent at
    the mean height of its children; nodes coloured by V; a branch point shows its
    IB-Score J, a leaf its reward R, an edge the advantage A of the step it leads
    to, and the first step of each continuation the round (r0, r1, ...) that
    sampled it."""
    plt = _pyplot()
    if plt is None:
        return None
    nodes = record["nodes"]
    children = {n["id"]: [] for n in nodes}
    for n in nodes:
        if n["parent"] is not None:
            children[n["parent"]].append(n["id"])
    y, rows = {}, 0
    for n in nodes:  # depth-first, the root first: leaves come in reading order
        if not children[n["id"]]:
            y[n["id"]], rows = rows, rows + 1
    for n in sorted(nodes, key=lambda n: -n["depth"]):  # deepest first: children are placed before parents
        if children[n["id"]]:
            y[n["id"]] = sum(y[c] for c in children[n["id"]]) / len(children[n["id"]])
    depth = max(n["depth"] for n in nodes)
    fig, ax = plt.subplots(figsize=(min(4 + 2.4 * depth, 40), 1.5 + 0.6 * rows))
    by_id = {n["id"]: n for n in nodes}
    for n in nodes:  # edges, each with the advantage of the step it leads to, near its child
        if n["parent"] is None:
            continue
        p = by_id[n["parent"]]
        ax.plot([p["depth"], n["depth"]], [y[p["id"]], y[n["id"]]], color="0.65", lw=1, zorder=1)
        ax.text(p["depth"] + 0.7 * (n["depth"] - p["depth"]), y[p["id"]] + 0.7 * (y[n["id"]] - y[p["id"]]) + 0.08,
                f"A={n['A']:+.2f}", fontsize=6, color="0.35", ha="center", va="top")
    dots = ax.scatter([n["depth"] for n in nodes], [y[n["id"]] for n in nodes], c=[n["V"] for n in nodes],
                      cmap="RdYlGn", vmin=0, vmax=1, s=110, edgecolors="k", zorder=2)
    for n in nodes:  # above a node its step's text; below it J at a branch point, or the round where a
        i, p = n["id"], by_id.get(n["parent"])  # continuation starts; right of a leaf its reward
        text = " / ".join(part for part in n["text"].strip().split("\n") if part)
        text = "".join(c if c.isprintable() else "·" for c in text)  # a random model's bytes
        label = "question" if p is None else (text[:22] + "…" if len(text) > 23 else text)
        ax.text(n["depth"], y[i] - 0.2, label, fontsize=7, ha="center", va="bottom", family="monospace")
        below = []
        if p is not None and (p["parent"] is None or n["round"] != p["round"]):
            below.append(f"r{n['round']}")
        if len(children[i]) >= 2:
            below.append(f"J={n['J']:+.2f}")
        if below:
            ax.text(n["depth"], y[i] + 0.2, "  ".join(below), fontsize=7, ha="center", va="top",
                    color="tab:blue" if len(children[i]) < 2 else "k", weight="bold" if len(children[i]) >= 2 else None)
        if n["terminal"]:
            ax.text(n["depth"] + 0.1, y[i], f"R={n['R']:g}", fontsize=8, va="center")
    fig.colorbar(dots, ax=ax, label="V (mean reward of the leaves below)", fraction=0.03)
    question = record["question"].replace("\n", " ")
    ax.set_title(f"{question[-70:]}   gold: {record['answer']}", fontsize=9)
    ax.set_xlabel("depth (step)")
    ax.set_yticks([])
    ax.set_xlim(-0.5, depth + 0.8)
    ax.set_ylim(rows - 0.3, -0.9)  # the first leaf at the top
    import warnings
    with warnings.catch_warnings():  # glyphs the font lacks (a random model's bytes, some scripts) show as boxes
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(run_dir: str) -> str | None:
    """run_dir/metrics.png: reward, Eff-Rate, IB-Score and the eval sets over steps."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("reward_mean", "eff_rate", "ib_score"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
    for key in sorted({k for r in rows for k in r if k.startswith("eval/")}):
        ax.plot(*zip(*[(r["step"], r[key]) for r in rows if key in r]), "o--", label=key)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, "metrics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="writes RUN_DIR/trees.png and "
                                 "RUN_DIR/metrics.png")
    ap.add_argument("run_dir")
    ap.add_argument("--tree", type=int, default=None, help="draw this line of trees.jsonl (default: the most telling)")
    args = ap.parse_args(argv)
    with open(os.path.join(args.run_dir, "trees.jsonl")) as f:
        records = [json.loads(line) for line in f]
    pick = most_telling(records)[0] if args.tree is None else args.tree
    print(draw_tree(records[pick], os.path.join(args.run_dir, "trees.png")), f"(tree {pick} of {len(records)})")
    print(plot_metrics(args.run_dir))


if __name__ == "__main__":
    main()
