"""A plain Avalanche script using moe-cl's pieces.

Attentive-gate mixture of experts + the sample-similarity regulariser L_s + Avalanche's own
ReplayPlugin, on split Fashion-MNIST (5 experiences), evaluated after every experience.

    python examples/avalanche_quickstart.py                  # split Fashion-MNIST
    python examples/avalanche_quickstart.py --benchmark tiny # synthetic, seconds
"""

import argparse

import torch
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.logging import InteractiveLogger
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

from moe_cl.core.zoo import get_architecture, mlp_architecture
from moe_cl.data.streams import make_benchmark
from moe_cl.training.evaluation import RoutingMetrics
from moe_cl.training.models import ExpertPolicy, MixtureOfExperts
from moe_cl.training.plugins import SampleSimilarityRegularizer
from moe_cl.training.strategies import MoEStrategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="split_fmnist", choices=["split_fmnist", "tiny"])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    bundle = make_benchmark(args.benchmark, n_experiences=5 if args.benchmark != "tiny" else 3,
                            seed=args.seed, data_root=args.data_root)
    if args.benchmark == "tiny":
        architecture = mlp_architecture(bundle.input_shape, bundle.n_classes)
    else:
        architecture = get_architecture("fmnist")
    model = MixtureOfExperts(architecture=architecture, gate="attentive", num_experts=2,
                             policy=ExpertPolicy("grow", per_experience=1))
    routing = RoutingMetrics()
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        routing,
        loggers=[InteractiveLogger()],
    )
    strategy = MoEStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=128,
        train_epochs=args.epochs,
        eval_mb_size=1024,
        plugins=[SampleSimilarityRegularizer(beta_s=1e-2, beta_d=1e-2),
                 ReplayPlugin(mem_size=500)],
        evaluator=evaluator,
    )
    for experience in bundle.benchmark.train_stream:
        strategy.train(experience)
        results = strategy.eval(bundle.benchmark.test_stream)
        accuracy = next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream"))
        r = routing.last_stream_result
        print(f"after experience {experience.current_experience}: accuracy {accuracy:.3f}  "
              f"experts {model.num_experts}  H_s {r['H_s']:.3f}  H_u {r['H_u']:.3f}  "
              f"I(E;Y) {r['MI']:.3f}  I(E;Y_pred) {r['MI_pred']:.3f} bits")


if __name__ == "__main__":
    main()
