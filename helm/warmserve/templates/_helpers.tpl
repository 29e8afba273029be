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

{{/* Namespaces that get application RBAC and the worker ServiceAccount. */}}
{{- define "warmserve.workerNamespaces" -}}
{{- $list := list .Release.Namespace }}
{{- range .Values.watchNamespaces }}{{ if not (has . $list) }}{{ $list = append $list . }}{{ end }}{{ end }}
{{- join "," $list }}
{{- end }}
