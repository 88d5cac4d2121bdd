#!/usr/bin/env python3
"""scripts/check_layers.py — fails when the crate's modules import each other in a cycle.

Why: pgshift is layered (docs/architecture.md): shared helpers and `protocol` at the
bottom, `config` as plain data, `net`/`upstream`, the session core, the policies beside
it, control/admin above, the CLI on top. A module that imports a module above it makes
both impossible to read or test alone; this check keeps the layers honest in CI.

What it reads: every `crate::...` path in src/ (in `use` items, grouped or not, and
inline in code), and `super::...` paths in submodules, with comments and string literals
removed. Test code counts like any other code. Two graphs are checked:
  1. top-level modules (src/<name>.rs or src/<name>/): no cycle at all;
  2. inside each directory, its files other than mod.rs (the directory's face, which
     declares and re-exports them): no cycle among siblings.
Usage: scripts/check_layers.py [--graph] [SRC_DIR]
  --graph  also prints each module's imports (top level), lowest layer first.
Exit status 1 and the cycles found when there is one; 0 otherwise.
"""

import os
import re
import sys


def strip_code(text):
    """Removes comments, string and char literals (keeps line structure loosely)."""
    out = []
    i, n = 0, len(text)
    depth = 0
    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if depth:
            if c == "/" and nxt == "*":
                depth += 1
                i += 2
            elif c == "*" and nxt == "/":
                depth -= 1
                i += 2
            else:
                i += 1
            continue
        if c == "/" and nxt == "/":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "/" and nxt == "*":
            depth = 1
            i += 2
            continue
        if c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            hashes = m.group(1)
            end = text.find('"' + hashes, i + len(m.group(0)))
            i = n if end < 0 else end + 1 + len(hashes)
            out.append('""')
            continue
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            out.append('""')
            continue
        if c == "'":
            # A char literal ('x', '\n', '\u{..}') and not a lifetime ('a).
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:])
            if m:
                i += len(m.group(0))
                out.append("' '")
                continue
        out.append(c)
        i += 1
    return "".join(out)


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"]."""
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [tree]
    prefix, inner = m.group(1), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    paths = []
    for p in parts:
        for e in expand_use(p):
            paths.append(prefix + e if e != "self" else prefix.rstrip(":"))
    return paths


def module_files(src):
    """Module path (tuple of names) -> file, for every .rs file under src."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]):
                parts = []
            mods[tuple(parts)] = os.path.join(root, f)
    return mods


def resolve(path, mods):
    """The longest module prefix of a `crate::` path (a tuple) that is a file."""
    for k in range(len(path), 0, -1):
        if tuple(path[:k]) in mods:
            return tuple(path[:k])
    return None


def imports(mod, file, mods):
    text = strip_code(open(file, encoding="utf-8").read())
    paths = []
    for m in re.finditer(r"\buse\s+([^;]*);", text):
        tree = m.group(1)
        if tree.startswith("crate::") or tree.startswith("super::") or tree.startswith("self::"):
            paths.extend(expand_use(tree))
    for m in re.finditer(r"(?<![\w:])(crate|super)((?:::\w+)+)", text):
        paths.append(m.group(1) + m.group(2))
    found = set()
    # super:: is relative to the module's parent (mod.rs files are their dir).
    for p in paths:
        segs = [s for s in p.split("::") if s]
        if segs[0] == "crate":
            full = segs[1:]
        elif segs[0] == "super":
            base = list(mod)
            while segs and segs[0] == "super":
                base = base[:-1]
                segs = segs[1:]
            full = base + segs
        elif segs[0] == "self":
            full = list(mod) + segs[1:]
        else:
            continue
        r = resolve(full, mods)
        if r is not None and r != mod:
            found.add(r)
    return found


def cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def shortest_loop(graph, comp):
    """One shortest cycle inside a component, for the message."""
    best = None
    members = set(comp)
    for start in comp:
        prev = {start: None}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(graph.get(v, ())):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    loop = list(reversed(path)) + [start]
                    if best is None or len(loop) < len(best):
                        best = loop
                    queue = []
                    break
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
    return best


def name(m):
    return "::".join(m) if m else "crate"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    src = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    mods = module_files(src)
    edges = {m: imports(m, f, mods) for m, f in mods.items()}

    failed = False
    top = {}
    for m, deps in edges.items():
        if not m:
            continue
        for d in deps:
            if d and d[0] != m[0]:
                top.setdefault(m[0], set()).add(d[0])
        top.setdefault(m[0], set())
    for comp in cycles(top):
        failed = True
        loop = shortest_loop(top, comp)
        print(f"cycle among top-level modules: {', '.join(comp)}")
        print(f"  for example: {' -> '.join(loop)}")
        for a in comp:
            for b in sorted(top[a] & set(comp)):
                why = sorted(
                    f"{name(x)} -> {name(y)}"
                    for x, ys in edges.items()
                    if x and x[0] == a
                    for y in ys
                    if y and y[0] == b
                )
                print(f"    {a} -> {b}: {'; '.join(why)}")

    dirs = {}
    for m in mods:
        if len(m) >= 2:
            dirs.setdefault(m[:-1], set()).add(m)
    for parent, children in sorted(dirs.items()):
        g = {c: {d for d in edges[c] if d in children} for c in children}
        for comp in cycles(g):
            failed = True
            loop = shortest_loop(g, comp)
            print(f"cycle among the files of {name(parent)}: {', '.join(name(c) for c in comp)}")
            print(f"  for example: {' -> '.join(name(c) for c in loop)}")

    if "--graph" in sys.argv:
        order, seen = [], set()

        def place(v, path=()):
            if v in seen or v in path:
                return
            for w in sorted(top.get(v, ())):
                place(w, path + (v,))
            if v not in seen:
                seen.add(v)
                order.append(v)

        for v in sorted(top):
            place(v)
        for v in order:
            print(f"{v}: {', '.join(sorted(top[v])) or '-'}")

    if failed:
        sys.exit(1)
    print(f"no import cycle among {len(top)} top-level modules and their files")


if __name__ == "__main__":
    main()
