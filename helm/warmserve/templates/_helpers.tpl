{{/* Chart name, truncated to 63 characters. */}}
{{- define "warmserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, or release-chart when they differ. */}}
{{- define "warmserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "warmserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Recommended labels (Helm best practices). */}}
{{- define "warmserve.labels" -}}
helm.sh/chart: {{ include "warmserve.chart" . }}
{{ include "warmserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: warmserve
{{- end }}

{{/* Selector labels: name and instance only. */}}
{{- define "warmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "warmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "warmserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "warmserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespaces where WarmPools and ModelDeployments live (worker.namespaces while the operator watches every
     namespace, else watchNamespaces), without the release namespace. */}}
{{- define "warmserve.poolNamespaces" -}}
{{- $list := list }}
{{- range (.Values.watchNamespaces | default .Values.worker.namespaces) }}
{{- if and (ne . $.Release.Namespace) (not (has . $list)) }}{{ $list = append $list . }}{{ end }}
{{- end }}
{{- join "," $list }}
{{- end }}

{{/* Namespaces that get the worker ServiceAccount and Role (and the workers' NetworkPolicy): the release
     namespace and those where WarmPools live. */}}
{{- define "warmserve.workerNamespaces" -}}
{{- $list := list .Release.Namespace }}
{{- range splitList "," (include "warmserve.poolNamespaces" .) }}{{ if . }}{{ $list = append $list . }}{{ end }}{{ end }}
{{- join "," $list }}
{{- end }}

{{/* Labels of a monitoring object (call with dict "root" $ "own" <its labels value> "component" <name>): the
     chart's, monitoring.labels, then the object's own; a later one wins on the same key. */}}
{{- define "warmserve.monitoringLabels" -}}
{{- $labels := fromYaml (include "warmserve.labels" .root) }}
{{- $_ := set $labels "app.kubernetes.io/component" .component }}
{{- $labels = mustMergeOverwrite $labels (.root.Values.monitoring.labels | default dict) (.own | default dict) }}
{{- toYaml $labels }}
{{- end }}

{{/* The router's name: its ServiceAccount, RBAC objects, Deployment, Service and PodDisruptionBudget. */}}
{{- define "warmserve.router.fullname" -}}
{{- printf "%s-router" (include "warmserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the router's pods: the chart's, plus component=router (the operator's are
     component=operator, so neither selects the other's pods). */}}
{{- define "warmserve.router.selectorLabels" -}}
{{ include "warmserve.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{/* Seconds a stopping router pod gets to drain: a held request may wait router.maxWaitSeconds before it
     is sent to an engine, plus a margin for the engine's answer and the shutdown itself. */}}
{{- define "warmserve.router.terminationGracePeriodSeconds" -}}
{{- add (ceil .Values.router.maxWaitSeconds) 30 }}
{{- end }}

{{/* The router's image: router.image, each field defaulting to the operator's image. */}}
{{- define "warmserve.router.image" -}}
{{- $repository := .Values.router.image.repository | default .Values.image.repository }}
{{- $tag := .Values.router.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
