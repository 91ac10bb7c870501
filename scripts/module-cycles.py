#!/usr/bin/env python3
"""Module cycles between the top-level modules of a crate.

usage: scripts/module-cycles.py SRC_DIR...   (e.g. vmm/src vmm/cli/src); exit 1 on a cycle

Every `crate::NAME` path (also inside `use crate::{a, b::c}` groups, comments ignored) in
SRC/NAME.rs or SRC/NAME/** is an edge NAME -> other; lib.rs and main.rs are the roots and are
not counted. Prints each strongly connected component of more than one module with its edges."""
import os, re, sys

def top_modules(src):
    mods = {}
    for entry in os.listdir(src):
        path = os.path.join(src, entry)
        name = entry[:-3] if entry.endswith('.rs') else entry
        if name in ('lib', 'main'):
            continue
        files = []
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                files += [os.path.join(root, n) for n in names if n.endswith('.rs')]
            if os.path.exists(path + '.rs'):
                files.append(path + '.rs')
        elif entry.endswith('.rs'):
            files.append(path)
        mods.setdefault(name, set()).update(files)
    return mods

def strip_comments(text):
    text = re.sub(r'//[^\n]*', '', text)
    return re.sub(r'/\*.*?\*/', '', text, flags=re.S)

def edges(mods):
    graph = {m: set() for m in mods}
    for mod, files in mods.items():
        for f in files:
            text = strip_comments(open(f).read())
            targets = set(re.findall(r'\bcrate::([a-z_][a-z0-9_]*)', text))
            for group in re.findall(r'\bcrate::\{([^}]*(?:\{[^}]*\}[^}]*)*)\}', text, re.S):
                depth, item = 0, ''
                for ch in group + ',':
                    if ch == '{': depth += 1
                    if ch == '}': depth -= 1
                    if ch == ',' and depth == 0:
                        head = item.strip().split('::')[0].strip()
                        if head: targets.add(head)
                        item = ''
                    else:
                        item += ch
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph

def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index: visit(v)
    return out

status = 0
for src in sys.argv[1:]:
    graph = edges(top_modules(src))
    found = cycles(graph)
    for comp in found:
        status = 1
        print(f"{src}: cycle among {', '.join(comp)}")
        for m in comp:
            print(f"    {m} -> {', '.join(sorted(graph[m] & set(comp)))}")
    if not found:
        print(f"{src}: no cycle among {len(graph)} top-level modules")
sys.exit(status)
