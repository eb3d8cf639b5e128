#!/usr/bin/env python3
"""The top-level module dependency graph of proxy/src from `crate::` paths,
and its cycles. Evidence for the one-way structure (config <- route/tls/
upstream/filter <- snapshot <- forward <- listener <- server):

    scripts/module-deps.py            # edges and cycles
    scripts/module-deps.py --dot      # Graphviz
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proxy", "src")
PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def top_module(path):
    rel = os.path.relpath(path, ROOT)
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def edges():
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            src = top_module(path)
            if src in ("lib", "main"):
                continue
            text = open(path, encoding="utf-8").read()
            # Test modules may reach anywhere; count what ships.
            text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
            for m in PATH.finditer(text):
                dst = m.group(1)
                if dst != src:
                    out.setdefault(src, set()).add(dst)
    return out


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def main():
    graph = edges()
    if "--dot" in sys.argv:
        print("digraph wasp {")
        for src in sorted(graph):
            for dst in sorted(graph[src]):
                print(f'  "{src}" -> "{dst}";')
        print("}")
        return
    for src in sorted(graph):
        print(f"{src} -> {', '.join(sorted(graph[src]))}")
    found = cycles(graph)
    print()
    if found:
        for comp in found:
            print("cycle among: " + ", ".join(comp))
    else:
        print("no cycles")


if __name__ == "__main__":
    main()
