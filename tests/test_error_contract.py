"""The README's promise, checked for the whole public API: every error on bad input is a
``lily_lab.LilyLabError`` that is also the builtin a Python user would expect (``ValueError``,
``TypeError``, ``FileNotFoundError`` / ``OSError``), and its message names the argument (or path)
that was wrong.

``CASES`` holds at least one bad input for every public function, class and method (see
``public_names``); ``test_every_public_callable_has_a_case`` fails when a new public name has none,
so new API must come with its case here — or, when it takes no input a user can get wrong, a line
in ``NO_USER_INPUT`` saying so. The ``lily-lab`` command's cases (one line on stderr, exit 2) are
at the end; they run ``lily_lab.app.cli.main`` in-process and never load a model.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import pytest
import torch

import lily_lab as ll
from lily_lab import plots, widgets
from lily_lab.app import commands, demo, llm
from lily_lab.app.cli import main

import _tiny_lm

# --------------------------------------------------------------------------- the objects cases use

NAMES = ["negative", "positive"]
_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
             "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _chat_tokenizer():
    """A word-level tokenizer with a small chat template (as tests/test_llm_chat.py's)."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    special = ["<unk>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = "the a movie was great awful good bad positive negative".split()
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                               extra_special_tokens=special[2:])
    out.chat_template = _TEMPLATE
    return out


@pytest.fixture(scope="module")
def x(tiny_bert, tmp_path_factory):
    """One namespace of everything the cases need: a tiny adapted BERT and a plain one, a labelled
    recording, a timeline, the analysis frames, a tiny chat LM, files and folders."""
    ns = types.SimpleNamespace()
    ns.tmp = tmp_path_factory.mktemp("contract")
    ns.model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=4, stride_A=2, num_B=3,
                                                      routing="token", init_weights=False))
    ns.plain = tiny_bert(seed=1)
    ids = torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(0))
    ns.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with ll.record_routing(ns.model) as rec, torch.no_grad():
        ns.model(**ns.batch)
        rec.annotate(labels=["a", "b", "a", "b"])
    ns.rec, ns.routing = rec, rec.routing
    ns.site = ns.routing.sites[0]
    ns.timeline = ll.Timeline(ns.batch)
    ns.timeline.observe(ns.model, 0)
    ns.usage = ns.routing.usage()
    ns.tokens = ns.routing.token_table()
    ns.profile = ll.expert_layer_profile(ns.routing)
    ns.modes = ll.analysis.mixture_modes(ns.routing)
    ns.spectra = ll.delta_spectra(ns.model)
    ns.ranks = ll.rank_summary(ns.spectra)
    ns.similarity = ll.expert_similarity(ns.model)
    ns.tok = _chat_tokenizer()
    ns.lm, _ = _tiny_lm.llama()
    ns.examples = llm.chat_examples(ns.tok, ["good", "bad"], [1, 0], NAMES)
    ns.csv = ns.tmp / "texts.csv"
    ns.csv.write_text("text,label\n" + "".join(f"the movie {i},{NAMES[i % 2]}\n" for i in range(12)))
    ns.folder = ns.tmp / "a_folder"
    ns.folder.mkdir()
    ns.adapter_dir = ll.save_adapter(ns.model, ns.tmp / "adapter")
    return ns


def _no_banks(x):
    """A timeline observed with ``track_experts=False``: routings, no copies of the banks."""
    t = ll.Timeline(x.batch, track_experts=False)
    t.observe(x.model, 0)
    return t


def _xlora_without_layers() -> torch.nn.Module:
    """A model holding an X-LoRA classifier (by its attributes) but no X-LoRA layer."""
    clf = torch.nn.Module()
    clf.layers = torch.nn.Sequential(torch.nn.Linear(4, 6))
    clf.log_scalings, clf.n_layers, clf.n_classes = [], 2, 3
    clf.make_dummy_scalings = lambda *args, **kwargs: None
    model = torch.nn.Module()
    model.proj, model.clf = torch.nn.Linear(4, 4), clf
    return model


def _enter(cm):
    """Enter and leave a context manager (``record_routing`` checks its arguments on entry)."""
    with cm:
        pass


# --------------------------------------------------------------------------- the case table
# (id, call, the builtin the error must also be, fragments of its message). The id's part before
# ":" is the public name the case covers ("Routing.save", "plots.plot_spectra", "demo.load_csv").

V, T, F, O = ValueError, TypeError, FileNotFoundError, OSError


def _closing(monitor):
    """``monitor``, closed (its traffic hooks removed) when the test ends."""
    _MONITORS.append(monitor)
    return monitor


_MONITORS: list = []


@pytest.fixture(autouse=True)
def _close_monitors():
    yield
    while _MONITORS:
        _MONITORS.pop().close()

CASES = [
    # ---- core: the adapter
    ("LilyConfig: r=0", lambda x: ll.LilyConfig(["query"], r=0), V, ("r must be", "got 0")),
    ("LilyConfig.from_json: not JSON", lambda x: ll.LilyConfig.from_json("{"), V, ("not valid JSON",)),
    ("LilyConfig.from_dict: not an object", lambda x: ll.LilyConfig.from_dict(5), V, ("JSON object", "int")),
    ("add_lily: model is a string", lambda x: ll.add_lily("bert", ll.LilyConfig(["query"])), T,
     ("add_lily", "model must be a torch.nn.Module", "str")),
    ("add_lily: config is a dict", lambda x: ll.add_lily(x.plain, {"target_modules": ["query"]}), T,
     ("config must be a lily_lab.LilyConfig", "dict")),
    ("remove_lily: no adapter", lambda x: ll.remove_lily(x.plain), V, ("no lily_lab Lily adapter", "add_lily")),
    ("set_lily_options: unknown option", lambda x: ll.set_lily_options(x.model, colour=1), V, ("'colour'",)),
    ("adapter_sites: not a model", lambda x: ll.adapter_sites("bert"), T, ("adapter_sites", "model", "str")),
    ("router_sites: not a model", lambda x: ll.router_sites("mixtral"), T, ("router_sites", "model", "str")),
    ("adapter_summary: not a model", lambda x: ll.adapter_summary(42), T, ("adapter_summary", "model", "int")),
    ("count_parameters: not a model", lambda x: ll.count_parameters(None), T,
     ("count_parameters", "model", "NoneType")),
    ("lily_aux_loss: not a model", lambda x: ll.lily_aux_loss([1.0]), T, ("lily_aux_loss", "model", "list")),
    ("save_adapter: unknown format", lambda x: ll.save_adapter(x.model, x.tmp / "ad", format="onnx"), V,
     ("format must be", "'onnx'")),
    ("save_adapter: no adapter", lambda x: ll.save_adapter(x.plain, x.tmp / "ad2"), V, ("add_lily",)),
    ("demo.require_safetensors_weights: missing folder",
     lambda x: demo.require_safetensors_weights(x.tmp / "no_model"), F, ("no_model",)),
    ("save_adapter: directory is a number", lambda x: ll.save_adapter(x.model, 5), T, ("directory", "int")),
    ("load_adapter: model is a string", lambda x: ll.load_adapter("bert", x.adapter_dir), T, ("model", "str")),
    ("load_adapter: no directory", lambda x: ll.load_adapter(x.plain, x.tmp / "no_adapter"), V,
     ("no adapter directory", "no_adapter")),
    # ---- observe: recording
    ("record_routing: max_tokens=-1", lambda x: _enter(ll.record_routing(x.model, max_tokens=-1)), V,
     ("max_tokens", "-1")),
    ("record_routing: gather='yes'", lambda x: _enter(ll.record_routing(x.model, gather="yes")), V,
     ("gather must be", "'yes'")),
    ("record_routing: no router", lambda x: _enter(ll.record_routing(x.plain)), V, ("nothing to record",)),
    ("record_dataset: loader is a number", lambda x: ll.record_dataset(x.model, 5, progress=False), T,
     ("loader must be an iterable", "int")),
    ("Recorder: max_tokens=1.5", lambda x: ll.Recorder(x.model, max_tokens=1.5), V, ("max_tokens", "1.5")),
    ("Recorder.annotate: too few labels", lambda x: x.rec.annotate(labels=["a"]), V, ("1 labels", "4 sequences")),
    ("Routing.record: unknown site", lambda x: x.routing.record("nope"), V, ("'nope'", "sites:")),
    ("Routing.probs: unknown site", lambda x: x.routing.probs("query"), V, ("'query'", "encoder.layer.0")),
    ("Routing.logits: unknown site", lambda x: x.routing.logits("nope"), V, ("'nope'",)),
    ("Routing.mixtures: unknown site", lambda x: x.routing.mixtures("nope"), V, ("'nope'",)),
    ("Routing.mean_mixture: unknown site", lambda x: x.routing.mean_mixture("nope"), V, ("'nope'",)),
    ("Routing.phase: unknown phase", lambda x: x.routing.phase("decoding"), V, ("'decoding'", "phases")),
    ("Routing.token_table: tokenizer is a number", lambda x: x.routing.token_table(tokenizer=5), T,
     ("tokenizer must be", "int")),
    ("Routing.merge: not recordings", lambda x: ll.Routing.merge(["rec.npz"]), T, ("recordings", "str")),
    ("Routing.merge: nothing", lambda x: ll.Routing.merge([]), V, ("at least one recording",)),
    ("Routing.save: missing folder", lambda x: x.routing.save(x.tmp / "nowhere" / "r.npz"), F, ("nowhere",)),
    ("Routing.load: missing file", lambda x: ll.Routing.load(x.tmp / "missing.npz"), V, ("missing.npz",)),
    ("Routing.gather: dst=-1", lambda x: x.routing.gather(dst=-1), V, ("dst", "-1")),
    ("Timeline: max_tokens=-1", lambda x: ll.Timeline(max_tokens=-1), V, ("max_tokens", "-1")),
    ("Timeline: probe is a string", lambda x: ll.Timeline("the movie"), T, ("probe must be", "str")),
    ("Timeline.observe: no probe", lambda x: ll.Timeline().observe(x.model, 0), V, ("probe",)),
    ("Timeline.observe: step is text", lambda x: ll.Timeline(x.batch).observe(x.model, "first"), V,
     ("step must be", "'first'")),
    ("Timeline.add: banks missing", lambda x: ll.Timeline().add(0, x.routing), V,
     ("Timeline.add", "track_experts=True", "pass banks=", "Timeline(track_experts=False)")),
    ("Timeline.save: missing folder", lambda x: x.timeline.save(x.tmp / "nowhere" / "t.npz"), F,
     ("Timeline.save", "cannot write the timeline file", "nowhere")),
    ("Timeline.load: missing file", lambda x: ll.Timeline.load(x.tmp / "missing_timeline.npz"), F,
     ("Timeline.load", "no timeline file", "missing_timeline.npz")),
    ("Timeline.load: a routing file", lambda x: ll.Timeline.load(x.routing.save(x.tmp / "a_routing.npz")), V,
     ("Timeline.load", "a_routing.npz", "is a routing file, not a timeline", "Routing.load")),
    ("RoutingCallback: every=0", lambda x: ll.RoutingCallback(every=0), V, ("every", "0")),
    ("RoutingCallback: stop_on='never'", lambda x: ll.RoutingCallback(stop_on="never"), V, ("stop_on", "'never'")),
    ("RoutingMonitor: per='layer'", lambda x: ll.RoutingMonitor(x.model, per="layer"), V, ("per must be", "'layer'")),
    ("RoutingMonitor: not a model", lambda x: ll.RoutingMonitor(x.routing), T, ("RoutingMonitor", "Routing")),
    ("RoutingMonitor.observe: step is text", lambda x: _closing(ll.RoutingMonitor(x.model)).observe("10"), T,
     ("step must be an integer", "'10'")),
    ("RoutingMonitor.observe_probe: no probe", lambda x: _closing(ll.RoutingMonitor(x.model)).observe_probe(0), V,
     ("Timeline.observe needs a probe batch",)),
    ("RoutingMonitor.metrics: not a recording", lambda x: _closing(ll.RoutingMonitor(x.model)).metrics(x.usage), T,
     ("router_metrics", "Routing")),
    ("diagnose: unknown check", lambda x: ll.diagnose(x.model, checks=["collapse"]), V, ("unknown checks", "'collapse'")),
    # ---- analysis
    ("router_metrics: not a recording", lambda x: ll.router_metrics(x.model), T,
     ("router_metrics", "routing must be a lily_lab.Routing", "BertModel")),
    ("specialization: by='expert'", lambda x: ll.specialization(x.routing, by="expert"), V, ("by", "'expert'")),
    ("specialization: min_count=-1", lambda x: ll.specialization(x.routing, min_count=-1), V, ("min_count",)),
    ("expert_layer_profile: not a recording", lambda x: ll.expert_layer_profile("rec.npz"), T,
     ("expert_layer_profile", "routing")),
    ("top_tokens: k=0", lambda x: ll.top_tokens(x.routing, k=0), V, ("k must be", "0")),
    ("top_tokens: not a recording", lambda x: ll.top_tokens(None), T, ("top_tokens", "routing")),
    ("expert_load: not a recording", lambda x: ll.expert_load(x.usage), T,
     ("expert_load", "routing must be a lily_lab.Routing", "DataFrame")),
    ("expert_load: no top-k router", lambda x: ll.expert_load(x.routing), V,
     ("expert_load", "top-k routers", "mix every expert")),
    ("expert_similarity: not a model", lambda x: ll.expert_similarity("adapter/"), T, ("expert_similarity", "model")),
    ("bank_summary: not a model", lambda x: ll.bank_summary(x.routing), T, ("bank_summary", "model", "Routing")),
    ("timeline_metrics: not a timeline", lambda x: ll.timeline_metrics(x.routing), T,
     ("timeline_metrics", "timeline must be")),
    ("timeline_expert_similarity: not a timeline", lambda x: ll.timeline_expert_similarity([]), T,
     ("timeline_expert_similarity", "timeline")),
    ("timeline_expert_trajectories: not a timeline", lambda x: ll.timeline_expert_trajectories(x.routing), T,
     ("timeline_expert_trajectories", "timelines must be a lily_lab.Timeline or a dict", "Routing")),
    ("timeline_expert_trajectories: a run is not a timeline",
     lambda x: ll.timeline_expert_trajectories({"run": x.timeline, "other": x.usage}), T, ("timelines['other']", "DataFrame")),
    ("timeline_expert_trajectories: unknown group",
     lambda x: ll.timeline_expert_trajectories(x.timeline, group="keys:32x32"), V, ("group='keys:32x32'", "'query:32x32'")),
    ("timeline_expert_trajectories: no banks kept", lambda x: ll.timeline_expert_trajectories(_no_banks(x)), V,
     ("no expert banks", "track_experts=True")),
    ("timeline_expert_trajectories: components=0", lambda x: ll.timeline_expert_trajectories(x.timeline, components=0),
     V, ("components must be", "0")),
    ("delta_spectra: no adapter", lambda x: ll.delta_spectra(x.plain), V, ("no adapter sites",)),
    ("delta_spectra: mixture is text", lambda x: ll.delta_spectra(x.model, "uniform"), T, ("mixture must be", "str")),
    ("delta_spectra: by='site'", lambda x: ll.delta_spectra(x.model, x.routing, by="site"), V, ("by", "'site'")),
    ("delta_spectra: model is a number", lambda x: ll.delta_spectra(3), T, ("model must be", "int")),
    ("rank_summary: not spectra", lambda x: ll.rank_summary(x.usage), V, ("rank_summary", "'sigma'")),
    ("rank_summary: not a frame", lambda x: ll.rank_summary([1.0, 0.5]), T, ("rank_summary", "list")),
    ("lora_equivalent_rank: no adapter", lambda x: ll.lora_equivalent_rank(x.plain), V, ("no adapter sites",)),
    ("intruder_dimensions: k=0", lambda x: ll.intruder_dimensions(x.model, k=0, progress=False), V, ("k must be",)),
    ("intruder_dimensions: a directory", lambda x: ll.intruder_dimensions(str(x.folder)), V,
     ("base weights", "a_folder")),
    ("merge_at: no adapter", lambda x: ll.merge_at(x.plain), V, ("merge_at", "no adapter sites")),
    ("merge_at: mixture=7", lambda x: ll.merge_at(x.model, 7), V, ("mixture=7", "0..2")),
    ("merge_error: no batches", lambda x: ll.merge_error(x.model, x.plain, []), V, ("batches",)),
    ("merge_error: merged is not a model", lambda x: ll.merge_error(x.model, "merged", []), T, ("merged", "str")),
    ("diagnose: unknown threshold", lambda x: ll.diagnose(x.model, thresholds={"dominant": 0.5}), V,
     ("'dominant'", "dominant_usage")),
    ("diagnose: thresholds is a number", lambda x: ll.diagnose(x.model, thresholds=0.9), T, ("thresholds", "float")),
    ("diagnose: routing is a frame", lambda x: ll.diagnose(x.model, x.usage), T, ("diagnose", "routing", "DataFrame")),
    ("diagnose: no adapter", lambda x: ll.diagnose(x.plain), V, ("no adapter sites",)),
    ("causal_consistency: an encoder", lambda x: ll.causal_consistency(x.model, x.batch["input_ids"]), T,
     ("causal language model", "BertModel")),
    ("sharing_layout: no adapter", lambda x: ll.sharing_layout(x.plain), V, ("no adapter sites",)),
    ("sharing_layout_from_config: a dict", lambda x: ll.sharing_layout_from_config({"r": 4}, 2, 8, 8), T,
     ("config must be", "dict")),
    ("sharing_layout_from_config: layers=0", lambda x: ll.sharing_layout_from_config(ll.LilyConfig(["q"]), 0, 8, 8),
     V, ("layers must be", "0")),
    ("parameter_budget: d_in=0", lambda x: ll.parameter_budget(0, 8, 2, [4]), V, ("d_in must be", "0")),
    ("parameter_budget: r_values empty", lambda x: ll.parameter_budget(8, 8, 2, []), V, ("r_values",)),
    ("parameter_budget: r_values is text", lambda x: ll.parameter_budget(8, 8, 2, None), T, ("r_values", "NoneType")),
    # ---- report
    ("report: no adapter", lambda x: ll.report(x.plain, None, x.tmp / "r.html"), V, ("no adapter sites",)),
    ("report: routing is a path", lambda x: ll.report(x.model, "rec.npz", x.tmp / "r.html"), T, ("routing", "str")),
    ("report: missing folder", lambda x: ll.report(x.model, None, x.tmp / "nowhere" / "r.html"), F,
     ("nowhere", "does not exist")),
    ("report: path is a folder", lambda x: ll.report(x.model, None, x.folder), O, ("a_folder", "is a folder")),
    ("report: include_plotlyjs=5", lambda x: ll.report(x.model, None, x.tmp / "r.html", include_plotlyjs=5), V,
     ("include_plotlyjs", "5")),
    # ---- plots: a frame without the columns, an unknown site or group, a bad option
    ("plots.plot_usage_heatmap: missing columns", lambda x: plots.plot_usage_heatmap(x.usage.drop(columns="usage")), V,
     ("plot_usage_heatmap", "['usage']", "Routing.usage()")),
    ("plots.plot_usage_bars: unknown site", lambda x: plots.plot_usage_bars(x.usage, "nope"), V,
     ("plot_usage_bars", "site='nope'", "encoder.layer.0.attention.self.query")),
    ("plots.plot_expert_load: missing columns", lambda x: plots.plot_expert_load(x.usage), V,
     ("plot_expert_load", "'tokens'", "expert_load(routing)")),
    ("plots.plot_expert_load: not a frame", lambda x: plots.plot_expert_load(x.routing), T,
     ("plot_expert_load", "DataFrame", "Routing")),
    ("plots.plot_label_usage: not a frame", lambda x: plots.plot_label_usage(x.routing), T,
     ("plot_label_usage", "DataFrame", "Routing")),
    ("plots.plot_expert_profile: unknown group", lambda x: plots.plot_expert_profile(x.profile, "keys:32x32"), V,
     ("group='keys:32x32'", "query:32x32")),
    ("plots.plot_metric_timeline: unknown metric", lambda x: plots.plot_metric_timeline(
        ll.timeline_metrics(x.timeline), metric="accuracy"), V, ("metric='accuracy'", "routing_mi")),
    ("plots.plot_mixture_modes: unknown site", lambda x: plots.plot_mixture_modes(x.modes, "nope"), V,
     ("site='nope'",)),
    ("plots.plot_token_probs: kind='bar'", lambda x: plots.plot_token_probs(x.tokens, x.site, kind="bar"), V,
     ("kind must be", "'bar'")),
    ("plots.plot_top_tokens: missing columns", lambda x: plots.plot_top_tokens(x.usage, x.site), V,
     ("plot_top_tokens", "'rank'", "top_tokens")),
    ("plots.plot_top_tokens: columns not a number",
     lambda x: plots.plot_top_tokens(ll.top_tokens(x.routing, k=2, min_count=1), x.site, columns="x"), V,
     ("columns", "'x'")),
    ("plots.plot_token_text: unknown sequence", lambda x: plots.plot_token_text(x.tokens, x.site, 99), V,
     ("sequence=99",)),
    ("plots.plot_token_routes: wrap=0", lambda x: plots.plot_token_routes(x.tokens, 0, wrap=0), V, ("wrap", "0")),
    ("plots.plot_token_routes: unknown site", lambda x: plots.plot_token_routes(x.tokens, 0, sites=["nope"]), V,
     ("['nope']",)),
    ("plots.prediction_for: predictions is a number", lambda x: plots.prediction_for(3, 0), T, ("predictions", "int")),
    ("plots.plot_spectra: facet='layer'", lambda x: plots.plot_spectra(x.spectra, facet="layer"), V,
     ("facet", "'layer'")),
    ("plots.plot_spectra: unknown site", lambda x: plots.plot_spectra(x.spectra, sites=["nope"]), V, ("['nope']",)),
    ("plots.plot_rank_by_layer: unknown metric", lambda x: plots.plot_rank_by_layer(x.ranks, "rank"), V,
     ("['rank']", "rank_summary")),
    ("plots.plot_expert_similarity: unknown group", lambda x: plots.plot_expert_similarity(x.similarity, "nope"), V,
     ("group='nope'",)),
    ("plots.plot_expert_trajectories: missing columns", lambda x: plots.plot_expert_trajectories(x.usage), V,
     ("plot_expert_trajectories", "'run'", "timeline_expert_trajectories")),
    ("plots.plot_expert_trajectories: step is text", lambda x: plots.plot_expert_trajectories(
        ll.timeline_expert_trajectories(x.timeline), step="last"), V, ("step must be", "'last'")),
    ("plots.plot_diagnosis: not the findings frame", lambda x: plots.plot_diagnosis(x.usage), V,
     ("plot_diagnosis", "'kind'", "to_frame")),
    ("plots.plot_sharing_diagram: missing columns", lambda x: plots.plot_sharing_diagram(x.usage), V,
     ("plot_sharing_diagram", "'a_index'")),
    ("plots.plot_parameter_budget: not a frame", lambda x: plots.plot_parameter_budget({"r": [1]}), T,
     ("plot_parameter_budget", "dict")),
    ("plots.expert_color: not an index", lambda x: plots.expert_color("red"), V, ("e must be", "'red'")),
    ("plots.evidence_html: evidence is a list", lambda x: plots.evidence_html([1], [], "site"), T,
     ("evidence must be", "list")),
    ("plots.finding_html: not a finding", lambda x: plots.finding_html({"kind": "x"}), T,
     ("finding must be", "severity")),
    # ---- widgets: checked before anything is drawn
    ("widgets.LilyDashboard: model is a path", lambda x: widgets.LilyDashboard("adapter/"), T,
     ("LilyDashboard", "model", "str")),
    ("widgets.LilyDashboard: timeline is a recording", lambda x: widgets.LilyDashboard(x.model, timeline=x.routing), T,
     ("timeline", "Routing")),
    ("widgets.RoutingDashboard: routing is a path", lambda x: widgets.RoutingDashboard(x.model, "r.npz"), T,
     ("RoutingDashboard", "routing", "str")),
    ("widgets.RouterExplorer: not a recording", lambda x: widgets.RouterExplorer(x.usage), T,
     ("RouterExplorer", "routing", "DataFrame")),
    ("widgets.ExpertMap: not a model", lambda x: widgets.ExpertMap(x.routing), T, ("ExpertMap", "model", "Routing")),
    ("widgets.SpectrumExplorer: routing is a path", lambda x: widgets.SpectrumExplorer(x.model, "r.npz"), T,
     ("SpectrumExplorer", "routing", "str")),
    ("widgets.CollapseDashboard: unknown threshold", lambda x: widgets.CollapseDashboard(x.model, thresholds={"x": 1}),
     V, ("thresholds", "'x'")),
    ("widgets.TimelinePlayer: not a timeline", lambda x: widgets.TimelinePlayer(x.routing), T,
     ("TimelinePlayer", "timeline", "Routing")),
    ("widgets.TimelinePlayer: a run is not a timeline", lambda x: widgets.TimelinePlayer({"run": x.routing}), T,
     ("TimelinePlayer", "timeline['run']", "Routing")),
    ("widgets.BudgetCalculator: d_in=0", lambda x: widgets.BudgetCalculator(d_in=0), V, ("d_in", "0")),
    # ---- lily_lab.app.llm
    ("llm.load_smollm2: cache_dir is a number", lambda x: llm.load_smollm2(cache_dir=5), T, ("cache_dir", "int")),
    ("llm.load_smollm2: cache_dir is a file", lambda x: llm.load_smollm2(cache_dir=x.csv), O,
     ("cache_dir", "texts.csv", "not a folder")),
    ("llm.pad_id: no pad, no EOS", lambda x: llm.pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=None)),
     V, ("pad", "EOS")),
    ("llm.answer_ids: no names", lambda x: llm.answer_ids(x.tok, []), V, ("names",)),
    ("llm.answer_ids: not a tokenizer", lambda x: llm.answer_ids("gpt2", NAMES), T, ("tokenizer", "str")),
    ("llm.chat_prompts: question without {text}", lambda x: llm.chat_prompts(x.tok, ["good"], NAMES, question="Why?"),
     V, ("question", "{text}")),
    ("llm.chat_prompts: max_length=0", lambda x: llm.chat_prompts(x.tok, ["good"], NAMES, max_length=0), V,
     ("max_length", "0")),
    ("llm.chat_examples: label names as labels", lambda x: llm.chat_examples(x.tok, ["good"], ["positive"], NAMES),
     V, ("labels", "indices")),
    ("llm.chat_examples: names is one string", lambda x: llm.chat_examples(x.tok, ["good"], [0], "positive"), T,
     ("names", "str")),
    ("llm.chat_dataset: texts is one string", lambda x: llm.chat_dataset(x.tok, "good", [1], NAMES), T,
     ("texts", "one")),
    ("llm.ChatDataset: not examples", lambda x: llm.ChatDataset({"input_ids": x.examples["input_ids"]}), V,
     ("ChatDataset", "attention_mask", "chat_examples")),
    ("llm.ChatDataset.collate: no rows", lambda x: llm.ChatDataset.collate([]), V, ("collate", "rows")),
    ("llm.answer_scores: repeated names", lambda x: llm.answer_scores(x.lm, x.tok, ["good"], ["good", "good"]), V,
     ("names", "differ")),
    ("llm.answer_scores: batch_size=0", lambda x: llm.answer_scores(x.lm, x.tok, ["good"], NAMES, batch_size=0), V,
     ("batch_size", "0")),
    ("llm.answer_accuracy: labels of other texts", lambda x: llm.answer_accuracy(x.lm, x.tok, ["good"], [0, 1], NAMES),
     V, ("1 texts", "2 labels")),
    ("llm.generate_answers: max_new_tokens=0", lambda x: llm.generate_answers(x.lm, x.tok, ["good"], NAMES,
                                                                               max_new_tokens=0), V,
     ("max_new_tokens", "0")),
    ("llm.train_chat: steps=0", lambda x: llm.train_chat(x.lm, x.examples, steps=0, progress=False), V,
     ("steps=0",)),
    ("llm.train_chat: examples is a list", lambda x: llm.train_chat(x.lm, [1, 2], steps=1), T, ("examples", "list")),
    # ---- lily_lab.app.demo: data and models
    ("demo.load_tweets: missing file", lambda x: demo.load_tweets(x.tmp / "tweets.csv"), F, ("tweets.csv", "load_csv")),
    ("demo.load_tweets: not the tweets file", lambda x: demo.load_tweets(x.csv), V, ("'sentiment'", "load_csv")),
    ("demo.load_csv: missing file", lambda x: demo.load_csv(x.tmp / "nodata.csv"), F, ("nodata.csv",)),
    ("demo.load_csv: unknown text column", lambda x: demo.load_csv(x.csv, text_column="tweet"), V,
     ("'tweet'", "text_column", "text, label")),
    ("demo.split_tweets: odd n_train", lambda x: demo.split_tweets(demo.load_csv(x.csv), n_train=3), V,
     ("n_train", "3")),
    ("demo.split_tweets: not a frame", lambda x: demo.split_tweets(["a tweet"]), V, ("tweets must be", "list")),
    ("demo.tokenize: no tokenizer", lambda x: demo.tokenize(None, ["a"]), T, ("tokenizer", "NoneType")),
    ("demo.tokenize: one string", lambda x: demo.tokenize(x.tok, "the movie"), T, ("texts", "one string")),
    ("demo.predict_logits: not encodings", lambda x: demo.predict_logits(x.model, {"input_ids": 1}), V,
     ("encodings", "attention_mask")),
    ("demo.take_rows: not a tokenized dataset", lambda x: demo.take_rows([1, 2], [0]), V, ("take_rows", "attention_mask")),
    ("demo.batch_indices: batch_size 0", lambda x: demo.batch_indices(10, 0, 3, torch.Generator()), V,
     ("batch_size", "got 0")),
    ("demo.paired_accuracy_test: shapes disagree",
     lambda x: demo.paired_accuracy_test(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(3)), V, ("logits_b", "(4, 2)")),
    ("demo.accuracy: shapes disagree", lambda x: demo.accuracy(torch.zeros(3, 2), torch.zeros(2)), V,
     ("labels", "(2,)", "(3, 2)")),
    ("demo.lora_rank_for_budget: no sites", lambda x: demo.lora_rank_for_budget(100, []), V, ("dims",)),
    ("demo.lora_parameter_count: dims not pairs", lambda x: demo.lora_parameter_count(4, [384]), V,
     ("dims", "(d_in, d_out)")),
    ("demo.load_minilm: num_labels=0", lambda x: demo.load_minilm(num_labels=0), V, ("num_labels", "0")),
    ("demo.load_minilm: missing folder", lambda x: demo.load_minilm(path=x.tmp / "no_model"), F, ("no_model",)),
    ("demo.model_hidden_size: missing folder", lambda x: demo.model_hidden_size(x.tmp / "no_model"), F,
     ("no_model",)),
    ("demo.save_head: not the head's names", lambda x: demo.save_head(x.model, ["classifier.weight"], x.tmp / "h"), V,
     ("names", "classifier.weight")),
    ("demo.head_num_labels: missing file", lambda x: demo.head_num_labels(x.tmp / "head.safetensors", 32), V,
     ("head.safetensors",)),
    ("demo.load_head: no head to load into", lambda x: demo.load_head(x.model, x.folder), V,
     ("a_folder", "no classification head")),
    # ---- lily_lab.app.commands (what `lily-lab` runs), called from Python
    ("commands.check_out_path: missing folder", lambda x: commands.check_out_path(x.tmp / "nowhere" / "r.html"), F,
     ("nowhere", "mkdir -p")),
    ("commands.run_demo: --out is a folder", lambda x: commands.run_demo(out=x.folder), O, ("--out", "is a folder")),
    ("commands.run_demo: steps=0", lambda x: commands.run_demo(steps=0), V, ("steps", "0")),
    ("commands.run_report: no adapter folder", lambda x: commands.run_report(x.tmp / "no_adapter"), V,
     ("no_adapter",)),
    # ---- PEFT X-LoRA (tests/test_xlora.py): a classifier without the layers it routes
    ("adapter_sites: an X-LoRA classifier without layers", lambda x: ll.adapter_sites(_xlora_without_layers()), V,
     ("X-LoRA classifier 'clf'", "no X-LoRA layers")),
    ("record_routing: an X-LoRA classifier without layers", lambda x: _enter(ll.record_routing(_xlora_without_layers())),
     V, ("X-LoRA classifier 'clf'", "no X-LoRA layers")),
    ("expert_similarity: an X-LoRA classifier without layers",
     lambda x: ll.expert_similarity(_xlora_without_layers()), V, ("X-LoRA classifier 'clf'", "no X-LoRA layers")),
]

# Public callables that take no input a user can get wrong: nothing to refuse.
NO_USER_INPUT = {
    "Site": "a record of one adapted layer, built by adapter_sites",
    "RouterSite": "a record of one mixture-of-experts router, built by router_sites",
    "LilyLayer": "the module add_lily and load_adapter build; not constructed by hand",
    "Diagnosis": "the result diagnose returns (a dataclass of findings); not constructed by hand",
    "Diagnosis.to_frame": "no arguments",
    "Routing": "a recording, built by record_routing, Routing.load and Routing.merge",
    "Routing.usage": "no arguments",
    "EarlyWarning": "the record of a warning RoutingMonitor gives; not constructed by hand",
    "RoutingMonitor.log_dict": "no arguments",
    "RoutingMonitor.close": "no arguments",
    "LilyConfig.to_dict": "no arguments",
    "LilyConfig.to_json": "no arguments",
    "plots.escape": "any value is text",
    "plots.message_figure": "shows any two texts (escaped)",
    "plots.site_label": "labels any module and layer (escaped)",
    "plots.bank_label": "labels any group key (escaped)",
    "plots.place_label": "labels any key (escaped)",
    "plots.count_label": "formats any count",
    "plots.number_label": "formats any value (non-numbers as text)",
    "plots.severity_color": "grey for any severity it does not know",
    "llm.smollm2_gguf_path": "no arguments (an uninstalled package is a LilyLabError naming the fix)",
    "llm.default_cache_dir": "no arguments",
    "llm.ChatDataset.to_datasets": "no arguments (without the datasets package: a LilyLabError naming the fix)",
    "demo.tweets_csv_path": "no arguments (an uninstalled package is a LilyLabFileNotFoundError naming the fix)",
    "demo.head_parameter_names": "any model has a head's parameter names ([] without a head)",
}

def _covered(cases) -> set[str]:
    return {case[0].split(":", 1)[0] for case in cases}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_lily_lab_error_naming_the_argument(case, x):
    _, call, builtin, says = case
    with pytest.raises(ll.LilyLabError) as info:
        call(x)
    assert isinstance(info.value, builtin), f"{type(info.value).__mro__} is not a {builtin.__name__}"
    for fragment in says:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


# --------------------------------------------------------------------------- what counts as public

_METHODS_OF = {  # classes whose public methods are entry points too, by the prefix their cases use
    "": [ll.Routing, ll.Recorder, ll.Timeline, ll.Diagnosis, ll.LilyConfig, ll.RoutingMonitor],
    "llm.": [llm.ChatDataset],
}


def public_names() -> set[str]:
    """Every public callable: ``lily_lab.__all__``; ``__all__`` of ``plots``, ``widgets`` and ``llm``;
    the functions ``lily_lab.app.demo`` and ``lily_lab.app.commands`` define without a leading underscore;
    and the public methods of ``Routing``, ``Recorder``, ``Timeline``, ``Diagnosis``, ``LilyConfig``, ``RoutingMonitor``
    and ``llm.ChatDataset``. Exceptions (what is raised) and constants (not callable) are left out."""
    names = set()

    def add(prefix, module, members):
        for name in members:
            obj = getattr(module, name)
            if not callable(obj) or (isinstance(obj, type) and issubclass(obj, BaseException)):
                continue
            names.add(prefix + name)

    add("", ll, ll.__all__)
    add("plots.", plots, plots.__all__)
    add("widgets.", widgets, widgets.__all__)
    add("llm.", llm, llm.__all__)
    for prefix, module in (("demo.", demo), ("commands.", commands)):
        add(prefix, module, [n for n, f in vars(module).items() if not n.startswith("_") and inspect.isfunction(f)
                             and f.__module__ == module.__name__])
    for prefix, classes in _METHODS_OF.items():
        for cls in classes:
            for n, v in vars(cls).items():
                if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, (classmethod, staticmethod))):
                    names.add(f"{prefix}{cls.__name__}.{n}")
    return names


def test_every_public_callable_has_a_case():
    public = public_names()
    missing = public - _covered(CASES) - set(NO_USER_INPUT)
    assert not missing, f"public callables without a bad-input case in CASES (or a reason in NO_USER_INPUT): " \
                        f"{sorted(missing)}"
    stale = (_covered(CASES) | set(NO_USER_INPUT)) - public
    assert not stale, f"entries that name no public callable (renamed or removed?): {sorted(stale)}"


def test_the_walk_sees_the_api():
    public = public_names()
    assert {"merge_at", "plots.plot_spectra", "widgets.LilyDashboard", "llm.train_chat", "demo.load_csv",
            "commands.run_report", "Routing.save", "Recorder.annotate", "Timeline.observe"} <= public
    assert "LilyLabError" not in public and "plots.TEMPLATE" not in public and "demo._model_path" not in public


# --------------------------------------------------------------------------- the lily-lab command
# In-process (lily_lab.app.cli.main), each refused before any model is loaded. tests/test_cli.py covers
# argparse's own refusals (a bad --routing, --steps 0, --r x); tests/test_untrusted_inputs.py the
# CSVs without rows, pickle-only model folders and --out; tests/test_commands.py runs a few of the
# cases below as subprocesses on the real MiniLM.


@pytest.fixture
def cli_dir(tmp_path):
    before = torch.get_num_threads()  # the commands set their thread count
    yield tmp_path
    torch.set_num_threads(before)


def _cli_cases(d: Path, csv: Path) -> dict:
    out = ["--out", str(d / "r.html")]
    return {  # case → (argv, fragments of the one line)
        "missing adapter folder": (["report", str(d / "no_adapter"), *out], ("no adapter directory", "no_adapter")),
        "missing CSV": (["report", str(d), "--data", str(d / "nodata.csv"), *out], ("no data file", "nodata.csv")),
        "missing --model folder": (["demo", "--model", str(d / "no_model"), *out], ("--model", "no_model")),
        "--text-column not in the CSV": (["report", str(d), "--data", str(csv), "--text-column", "tweet", *out],
                                         ("'tweet'", "text_column")),
        "--n-train odd": (["demo", "--data", str(csv), "--n-train", "3", "--n-heldout", "2", *out,
                           "--out-dir", str(d / "ad")], ("n_train", "3")),
        "--causal-lm without --model": (["demo", "--causal-lm", *out], ("--causal-lm needs --model",)),
    }


@pytest.mark.parametrize("case", list(_cli_cases(Path("."), Path("."))))
def test_cli_bad_input_is_one_line_and_exit_2(case, cli_dir, capsys):
    csv = cli_dir / "texts.csv"
    csv.write_text("text,label\n" + "".join(f"the movie {i},{NAMES[i % 2]}\n" for i in range(12)))
    argv, says = _cli_cases(cli_dir, csv)[case]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lily-lab: error: "), (rc, err[-800:])
    assert "Traceback" not in err
    for fragment in says:
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    assert not (cli_dir / "r.html").exists()
