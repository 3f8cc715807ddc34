{{/* Names and labels shared by every template. */}}

{{- define "sidegate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release> when it already contains the chart name, else <release>-sidegate; at most 50
     characters, so names made of it and a suffix of up to 13 stay within the 63 of a DNS label
     (Services, label values). Longer suffixes cut the fullname part, never the suffix. */}}
{{- define "sidegate.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sidegate.operatorName" -}}
{{- printf "%s-operator" (include "sidegate.fullname" .) }}
{{- end }}

{{/* 17 characters of suffix: the fullname part is cut to 46. */}}
{{- define "sidegate.metricsServiceName" -}}
{{- printf "%s-operator-metrics" (include "sidegate.fullname" . | trunc 46 | trimSuffix "-") }}
{{- end }}

{{- define "sidegate.webhookServiceName" -}}
{{- printf "%s-webhook" (include "sidegate.fullname" .) }}
{{- end }}

{{/* Cluster-scoped objects carry the release namespace in their name, so the same release name
     installs in two namespaces. Names over 63 characters are cut to 54 and end in 8 hex digits
     of the whole name's sha256, so two long namespaces never share one. Argument: the name. */}}
{{- define "sidegate.clusterScopedName" -}}
{{- if le (len .) 63 }}
{{- . }}
{{- else }}
{{- printf "%s-%s" (. | trunc 54 | trimSuffix "-") (sha256sum . | trunc 8) }}
{{- end }}
{{- end }}

{{- define "sidegate.webhookConfigName" -}}
{{- include "sidegate.clusterScopedName" (printf "%s-%s" (include "sidegate.fullname" .) .Release.Namespace) }}
{{- end }}

{{/* The ClusterRole and ClusterRoleBinding. */}}
{{- define "sidegate.clusterRoleName" -}}
{{- include "sidegate.clusterScopedName" (printf "%s-%s" (include "sidegate.operatorName" .) .Release.Namespace) }}
{{- end }}

{{- define "sidegate.certSecretName" -}}
{{- printf "%s-webhook-cert" (include "sidegate.fullname" .) }}
{{- end }}

{{- define "sidegate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sidegate.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sidegate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sidegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "sidegate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sidegate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: sidegate
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* repository:tag or repository@digest; tag defaults to appVersion. */}}
{{- define "sidegate.image" -}}
{{- $img := index . 0 }}{{- $ctx := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $ctx.Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/* DNS names of the webhook Service, as the serving certificate must carry them. */}}
{{- define "sidegate.webhookDNSNames" -}}
{{- $svc := include "sidegate.webhookServiceName" . }}
- {{ $svc }}.{{ .Release.Namespace }}.svc
- {{ $svc }}.{{ .Release.Namespace }}.svc.cluster.local
{{- end }}

{{/* The operator's rules on namespaced resources: in the ClusterRole (watchNamespaces empty)
     or in a Role of each watched namespace. */}}
{{- define "sidegate.namespacedRules" -}}
# Read the API objects it reconciles.
- apiGroups: ["sidegate.dev"]
  resources: ["aigateways", "providerkeys"]
  verbs: ["get", "list", "watch"]
# Report status (server-side apply of the status subresource).
- apiGroups: ["sidegate.dev"]
  resources: ["aigateways/status", "providerkeys/status"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion on rendered objects point at the AIGateway.
- apiGroups: ["sidegate.dev"]
  resources: ["aigateways/finalizers"]
  verbs: ["update"]
# Rendered ConfigMaps: watch its own (label-selected, metadata only), read and apply them.
# The webhook reads (get) those a pod's envFrom names, for their keys.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Key Secrets referenced by ProviderKeys/AIGateways (read) and the rendered keys Secrets
# (apply). list/watch are metadata-only watches that map Secret changes to gateways. The
# webhook reads (get) those a pod's envFrom names, for their keys.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Pods that name a gateway but run without the sidecar (status.uninjectedPods): a
# metadata-only watch and list, then a read of the few the webhook did not mark injected.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Events on transitions (KeyMissing, Rendered, Ready, ...).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
