"""Pattern rules: on/off neuron patterns that imply a decision, mined, verified, applied."""

from collections import Counter

import numpy as np
import streamlit as st

from frontend import components as ui
from frontend.client import ApiError
from frontend.figures import patterns as figures

st.title("Pattern rules")
st.caption(
    "Much of a ReLU network's logic lives in which neurons are on or off. A decision tree over "
    "the on/off pattern at one layer (fitted on gallery inputs or on a dataset you upload) "
    "yields rules such as *if L2.n17 on and L2.n40 off then class 7*, scored on held-out "
    "inputs. Each rule is then checked with a MILP over the whole network (on few inputs, such "
    "as ACAS Xu's, by splitting the input box and bounding each piece with CROWN): proven for "
    "every input of the domain whose pattern satisfies it, refuted by a counterexample that a "
    "forward pass confirms, or unknown at the time-out (Gopinath et al., Property Inference "
    "for Deep Neural Networks)."
)



def reverify(result: dict, rule: dict, index: int) -> None:
    """Verify the chosen rule again as its own job (longer time-out, another verifier)."""
    with st.expander("Re-verify this rule"):
        r1, r2 = st.columns(2)
        seconds = r1.slider("Seconds", 5, 600, 60, key="reverify_seconds")
        how = r2.radio("Verifier", ["auto", "milp", "split"], horizontal=True,
                       key="reverify_method")
        ball = result["domain"] == "ball" and rule["covered"]
        spec = {"layer": rule["layer"], "on": rule["on"], "off": rule["off"],
                "target": rule["target"], "lowest": rule["lowest"],
                "domain": "ball" if ball else "box", "eps": result["eps"],
                "timeout": float(seconds), "method": how}
        if ball:
            spec["center"] = [float(v) for v in np.asarray(rule["covered"][0]).reshape(-1)]
        verdict = ui.run_job("patterns_verify", spec, key=f"reverify{index}")
        if verdict:
            st.markdown(f"**{verdict['status']}** in {verdict['seconds']:.1f}s: "
                        f"{verdict['message']}")
            if verdict["counterexample"] is not None:
                st.caption(f"counterexample: class {verdict['counterexample_class']} wins")


def refuted(result: dict, rule: dict) -> None:
    """What a refuted rule still offers: its counterexample, the rule restricted by more
    literals, and the input properties of the inputs it covers, each with its own verdict."""
    where = ("the input box" if result["domain"] == "box" else
             f"the eps {result['eps']:g} ball around the first input it covers")
    st.markdown(f"**Counterexample** on {where}: an input whose pattern satisfies the rule "
                f"gets class {rule['counterexample_class']} instead of {rule['target']} "
                "(confirmed by a forward pass; the last thumbnail below).")
    st.markdown("**What can be proven instead**")
    refined = rule.get("refined")
    if refined:
        outcome = {
            "proven": "**proven**",
            "no support": "not found: every literal that excludes the counterexample drops "
                          "all the inputs the rule covers",
            "counterexample": f"still refuted after {refined['literals_added']} literals "
                              "(the step limit)",
            "unknown": f"unknown ({refined['message']})",
        }.get(refined["outcome"], refined["outcome"])
        st.markdown(f"The rule restricted by {refined['literals_added']} more literals: "
                    f"`{refined['text']}`: {outcome}; it fires on {refined['support']} "
                    "held-out inputs it covered.")
    rows = figures.properties_table(rule)
    if rows:
        proven = sum(p["status"] == "proven" or (p["ball"] or {}).get("status") == "proven"
                     for p in rule["properties"])
        st.markdown(f"Input properties of {len(rows)} inputs the rule covers (the polytope of "
                    f"each one's pattern up to L{rule['layer']}): {proven} proven to imply "
                    f"class {rule['target']}.")
        st.dataframe(rows, hide_index=True)
        st.caption("Each property says: every input of the domain with this input's on/off "
                   "pattern up to the layer gets the rule's class; where the whole box "
                   "refutes it, the polytope within the input's eps-ball is checked too. Its "
                   "extent: the largest L-inf ball around the input inside the polytope, and "
                   "the largest L-inf and L2 balls anywhere inside it (within the domain).")
    elif not refined:
        st.caption("The job neither refined this rule nor checked input properties "
                   "(both set to 0).")


def _rule_spec(rule: dict, ball: bool) -> dict | None:
    """The rule as ``POST /api/patterns/verify`` takes it; None if a ball has no centre."""
    spec = {k: rule[k] for k in ("layer", "on", "off", "target", "lowest")}
    if not ball:
        return spec
    if not rule["covered"]:
        return None
    return spec | {"center": [float(v) for v in np.asarray(rule["covered"][0]).reshape(-1)]}


def verify_all(model_id: str, result: dict, settings: dict) -> list[dict | None] | None:
    """Verify every rule as one batch of parallel jobs: a Verify button, then one progress bar
    with a Cancel button; returns the batch's result items in rule order (None for a rule with
    no covered input to centre its ball on), once the batch has finished."""
    ball = result["domain"] == "ball"
    specs = [_rule_spec(r, ball) for r in result["rules"]]
    sent = [s for s in specs if s is not None]
    shared = {"domain": result["domain"], "eps": result["eps"]} | settings
    signature = repr((model_id, sent, shared))
    state = st.session_state.get("_pattern_batch")
    if state is not None and state["signature"] != signature:
        state = None
    api = ui.client()
    if sent and st.button("Verify all rules in parallel", icon=":material/fact_check:",
                          help=f"one verification job per rule ({len(sent)}), "
                               f"{settings['timeout']:.0f} s each at most"):
        state = {"signature": signature, "items": None,
                 "id": api.verify_rules(model_id, sent, **shared)["id"]}
        st.session_state["_pattern_batch"] = state
    if len(sent) < len(specs):
        st.caption(f"{len(specs) - len(sent)} rules cover no held-out input, so they have no "
                   "ball to be verified in.")
    if state is None:
        return None
    if state["items"] is None:
        ui.follow([api.batch(state["id"])], api.batch, key="verify_all",
                  cancel=api.cancel_batch,
                  text=lambda b: f"Verifying {b[0]['total']} rules: {b[0]['message']}")
        state["items"] = api.batch_result(state["id"])["items"]
    items = iter(state["items"])
    return [None if s is None else next(items) for s in specs]


def dataset_source(model_id: str) -> tuple[bool, str | None]:
    """Mining controls' source: ``(ready, dataset id or None for the gallery)``."""
    source = st.radio("Mine from", ["gallery", "uploaded file"], horizontal=True,
                      help="the model's gallery, or your own inputs: .npz (x, optional labels "
                           "y), .npy of inputs, or .csv with one input per row (labels are "
                           "not needed: rules explain the network's own decisions)")
    if source == "gallery":
        try:
            inputs = ui.client().inputs(model_id)
        except ApiError as exc:
            st.error(str(exc))
            return False, None
        if not any(i.get("source") == "gallery" for i in inputs):
            st.warning("This model has no gallery to mine rules from (its card names no "
                       "dataset with one). Upload a dataset file here, or give the model a "
                       "card with its dataset in the sidebar.")
            return False, None
        return True, None
    upload = st.file_uploader("Dataset file", type=["npz", "npy", "csv"],
                              key=f"pattern_dataset_{model_id}")
    if upload is None:
        st.info("Upload a dataset file to mine from.")
        return False, None
    uploaded = st.session_state.setdefault("_pattern_datasets", {})
    key = (model_id, upload.file_id)
    if key not in uploaded:
        try:
            uploaded[key] = ui.client().upload_dataset(model_id, upload.name,
                                                          upload.getvalue())
        except ApiError as exc:
            st.error(f"Upload of {upload.name} failed: {exc}")
            return False, None
    info = uploaded[key]
    st.caption(f"{info['n']} inputs of shape {tuple(info['shape'][1:])}"
               + (", with labels" if info["has_labels"] else ""))
    return True, info["id"]


selection = ui.sidebar()
c1, c2, c3, c4 = st.columns(4)
layer = c1.number_input("ReLU layer (-1 = last)", -8, 8, -1, step=1)
target_text = c2.text_input("Target class (empty = all)", "")
domain = c3.radio("Domain", ["ball", "box"], horizontal=True,
                  help="ball: eps-ball around an input the rule covers; box: the input range")
eps = c4.number_input("eps", 0.005, 0.5, 0.05, step=0.005, format="%.3f")
c5, c6, c7, c8 = st.columns(4)
verify = c5.slider("Rules to verify", 0, 20, 5)
timeout = c6.slider("Seconds per rule", 2, 120, 20)
min_precision = c7.slider("Min. leaf precision", 0.5, 1.0, 0.9, step=0.05)
method = c8.radio("Verifier", ["auto", "milp", "split"], horizontal=True,
                  help="milp: one MILP over the domain; split: branch and bound over the input "
                       "box with CROWN, MILP on small pieces; auto: split for few inputs")
params = {"layer": int(layer), "domain": domain, "eps": float(eps), "verify": verify,
          "timeout": float(timeout), "min_precision": float(min_precision), "method": method}
if st.checkbox("The lowest score decides (ACAS Xu)", key="pattern_lowest",
               help="for networks whose decision is the output with the lowest score, such as "
                    "ACAS Xu's advisories; rules, proofs and coverage then explain that one"):
    params["lowest"] = True
if target_text.strip():
    if target_text.strip().isdigit():
        params["target"] = int(target_text)
    else:
        st.warning("The target class must be a whole number; mining for all classes.")

ready, dataset_id = dataset_source(selection.model_id) if selection.model else (True, None)
if dataset_id:
    params["dataset_id"] = dataset_id
result = ui.run_job("patterns", params, key="patterns") if ready else None
if result:
    rules = result["rules"]
    proven = sum(r["status"] == "proven" for r in rules)
    st.subheader(f"{len(rules)} rules at L{result['layer']}, {proven} proven")
    m = st.columns(4)
    m[0].metric("Held-out inputs", result["num_heldout"])
    m[1].metric("Neurons in the layer", result["num_neurons"])
    m[2].metric("Rule-list fidelity", f"{result['fidelity']:.1%}",
                help=f"a distilled list of {result['rule_list_size']} rules agrees with the "
                     "network on this share of held-out inputs")
    coverage = result.get("proven_coverage")
    if coverage:
        m[3].metric("Proven coverage", f"{coverage['fraction']:.1%}",
                    help="the share of held-out inputs whose decision a proven rule or their "
                         "own input property implies (Geng et al., ICML 2023)")
        st.caption(figures.coverage_summary(coverage))
    with st.expander("Rule-list size vs fidelity"):
        ui.show_figure(figures.tradeoff(result), "pattern_rule_list_tradeoff")
        st.caption("Decision trees over the layer's pre-activations (threshold literals) or "
                   "its on/off pattern, cut to at most 10, 30 or 100 leaves or left whole; "
                   "fidelity is measured on the held-out inputs. The circled list is the one "
                   "reported above.")
    if rules:
        try:
            verdicts = verify_all(selection.model_id, result,
                                  {"timeout": float(timeout), "method": method})
        except ApiError as exc:
            st.error(str(exc))
            verdicts = None
        if verdicts:
            counts = Counter(row["status"] for row in figures.rule_table(result, verdicts))
            st.markdown("Verified in parallel: "
                        + ", ".join(f"{n} {status}" for status, n in counts.most_common()))
        st.dataframe(figures.rule_table(result, verdicts), hide_index=True)
        below = sum(r["precision"] < min_precision for r in rules)
        st.caption(f"A leaf becomes a rule when at least {min_precision:.0%} of the mining "
                   "inputs it holds have its class; support, precision and recall above are "
                   "measured on held-out inputs" + (
                       f", where {below} of the rules fall below that share." if below
                       else "."))
        names = [f"{i}: {r['text']}" for i, r in enumerate(rules)]
        chosen = st.selectbox("Rule", range(len(rules)), format_func=lambda i: names[i])
        rule = rules[chosen]
        st.markdown(f"**{rule['text']}** — {rule['status']}"
                    + (f" ({rule['message']})" if rule["message"] else ""))
        if rule["status"] == "counterexample":
            refuted(result, rule)
        reverify(result, rule, chosen)
        ui.show_figure(figures.rule_neurons(result, chosen), "pattern_rule_neurons")
        ui.show_figure(figures.covered_inputs(result, chosen), "pattern_rule_inputs")
    else:
        st.info("No leaf was pure enough: lower the minimum precision or pick another layer.")
    current = result.get("current")
    if current:
        st.subheader("The current input")
        fired = [rules[i]["text"] for i in current["fired"]]
        st.markdown(f"Decision: class {current['decision']}. Rules that fire: "
                    + (", ".join(f"`{t}`" for t in fired) if fired else "none"))
        st.markdown(
            f"Robustness radius (its pattern polytope up to L{result['layer']}, "
            f"{current['num_constraints']} constraints): L-inf {current['radius_linf']:.4f}, "
            f"L2 {current['radius_l2']:.4f}. Decision on the polytope within the eps-ball: "
            f"**{current['polytope_status']}**.")
