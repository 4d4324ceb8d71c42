#!/usr/bin/env bash

#SBATCH -J merf-dask
#SBATCH -e logs/merf-dask-%J.err
#SBATCH -o logs/merf-dask-%J.out
#SBATCH -p compute
#SBATCH -A merf
#SBATCH -n 1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH -t 02:00:00
#SBATCH --exclusive

PYTHON -m distributed.cli.dask_worker tcp://SCHEDULER:PORT --name dummy-name --nthreads 1 --memory-limit 4.00GiB --nworkers 16 --nanny --death-timeout 60 --local-directory ${TMPDIR:-/tmp} --lifetime 110m --lifetime-stagger 5m
