#!/usr/bin/env python3
"""Fails when modules of one crate depend on each other in a cycle.

A module depends on another when its non-test code names it through a
`crate::` or `super::` path. A module may use its own submodules and its
ancestors; anything else that leads back to it is a cycle, which makes the
two one module in all but name. Usage: scripts/module-cycles.py SRC_DIR...
"""
import os
import re
import sys

IDENT = r"[a-z_][a-z0-9_]*"


def modules(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            parts = os.path.relpath(path, src)[:-3].split("/")
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]):
                parts = []
            mods["::".join(parts)] = path
    return mods


def owner(name, mods):
    """The deepest module a path names."""
    parts = name.split("::")
    while parts:
        key = "::".join(parts)
        if key in mods:
            return key
        parts.pop()
    return None


def references(module, path):
    text = open(path).read()
    # Unit tests sit at the end of a file; they may reach anywhere.
    text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
    refs = set(re.findall(rf"crate::({IDENT}(?:::{IDENT})*)", text))
    for group in re.findall(r"use crate::\{([^}]*)\}", text):
        for item in group.split(","):
            segs = [s for s in item.strip().split("::") if re.fullmatch(IDENT, s)]
            if segs:
                refs.add("::".join(segs))
    parent = module.split("::")[:-1]
    for rel in re.findall(rf"super::({IDENT}(?:::{IDENT})*)", text):
        refs.add("::".join(parent + [rel]))
    return refs


def cycles(src):
    mods = modules(src)
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for r in references(m, path):
            t = owner(r, mods)
            related = t == m or m.startswith(t + "::") or t.startswith(m + "::") if t else True
            if t and not related:
                graph[m].add(t)
    # Tarjan's strongly connected components.
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append({a: sorted(graph[a] & set(comp)) for a in comp})

    for v in graph:
        if v not in index:
            visit(v)
    return found


bad = False
for src in sys.argv[1:]:
    for comp in cycles(src):
        bad = True
        print(f"{src}: module cycle:")
        for a, deps in sorted(comp.items()):
            print(f"  {a or 'crate root'} -> {', '.join(deps)}")
if bad:
    sys.exit(1)
print(f"no module cycles in {len(sys.argv) - 1} crates")
