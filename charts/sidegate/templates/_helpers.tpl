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

{{/* The Secret of the webhook's serving certificate. Each certificate mode has its own, so a
     switch of webhook.certMode on upgrade never serves one mode's certificate to a caBundle
     that trusts the other's: self-managed, the Secret the operator writes (--webhook-secret);
     cert-manager, the Certificate's, mounted by the pods (a new pod waits for it to be issued
     while the old ones keep serving). 21 characters of suffix: the fullname part is cut to 42. */}}
{{- define "sidegate.certSecretName" -}}
{{- if eq .Values.webhook.certMode "cert-manager" }}
{{- printf "%s-webhook-cert-manager" (include "sidegate.fullname" . | trunc 42 | trimSuffix "-") }}
{{- else }}
{{- printf "%s-webhook-cert" (include "sidegate.fullname" .) }}
{{- end }}
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

{{/* Refuses values the schema cannot compare with each other, saying why. Included by
     deployment.yaml, so every render checks them. */}}
{{- define "sidegate.validateValues" -}}
{{- $replicas := int .Values.replicaCount }}
{{- if and (not .Values.leaderElection.enabled) (gt $replicas 1) }}
{{- fail (printf "replicaCount=%d needs leaderElection.enabled=true: replicas without leader election would each run the controllers and reconcile the same gateways at once; set replicaCount=1 to run without it" $replicas) }}
{{- end }}
{{- if and .Values.webhook.enabled (eq (int .Values.webhook.port) (int .Values.operator.adminPort)) }}
{{- fail (printf "webhook.port and operator.adminPort are both %d: the operator cannot bind its second listener there and would crash-loop; give them different ports" (int .Values.webhook.port)) }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (gt $replicas 1) }}
{{- $min := $pdb.minAvailable }}
{{- $needed := 0 }}
{{- if kindIs "string" $min }}
{{- /* A percentage is rounded up, as the disruption controller does for minAvailable. */}}
{{- $needed = div (add (mul $replicas (atoi (trimSuffix "%" $min))) 99) 100 | int }}
{{- else }}
{{- $needed = int $min }}
{{- end }}
{{- if ge $needed $replicas }}
{{- fail (printf "podDisruptionBudget.minAvailable=%v with replicaCount=%d keeps all %d replicas up: no voluntary eviction is ever allowed, so draining a node that runs an operator pod hangs; set minAvailable below replicaCount (at most %d) or raise replicaCount" $min $replicas $needed (sub $replicas 1)) }}
{{- end }}
{{- end }}
{{- end }}
