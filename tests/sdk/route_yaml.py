"""`spec.routes` YAML for test gateways: dynamic routes through one rate or budget node."""


def route(name, cap, fallback="over"):
    """Route `name`: start -> `cap` (the rate or budget node's fields) -> gpt-4o, over the
    limit -> `fallback` (gpt-4o-mini, or `e` for the node's 429)."""
    return (
        f"    - name: {name}\n"
        "      nodes:\n"
        "        - {id: s, type: start, next: cap}\n"
        f"        - {{id: cap, {cap}, next: main, fallback: {fallback}}}\n"
        "        - {id: main, type: model, provider: openai, model: gpt-4o, next: e}\n"
        "        - {id: over, type: model, provider: openai, model: gpt-4o-mini, next: e}\n"
        "        - {id: e, type: end}\n"
    )


def routes(*rs):
    """`spec.routes` of the routes `rs` (`route`'s)."""
    return "  routes:\n" + "".join(rs)
